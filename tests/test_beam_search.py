"""Beam search: exact on a tiny vocabulary, batched = one by one, beam 1 = greedy, limits respected."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from captioner import beam_search
from conftest import EOS, VOCAB, image_tokens, tiny_model

def sequence_logprob(model, tokens, caption):
    """Sum of log-probabilities of caption (list of ids ending with EOS), by one teacher-forced forward."""
    input_ids = torch.tensor([[EOS] + caption[:-1]])
    logprobs = F.log_softmax(model(tokens[None], input_ids)[0][0].double(), dim=-1)
    return sum(logprobs[t, token].item() for t, token in enumerate(caption))


def exhaustive_best(model, tokens, max_length, length_penalty):
    """Score every caption of up to max_length tokens (EOS included) and return the best one."""
    best, best_score = None, -math.inf
    for length in range(1, max_length + 1):
        for words in itertools.product(range(VOCAB - 1), repeat=length - 1):
            caption = list(words) + [EOS]
            score = sequence_logprob(model, tokens, caption) / length ** length_penalty
            if score > best_score:
                best, best_score = caption, score
    return best, best_score


def strip(row):
    row = row.tolist()
    return row[: row.index(EOS) + 1]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    model, max_length = tiny_model(), 4
    tokens = image_tokens(model, 3)
    # a beam as wide as the number of prefixes (4**3 = 64) keeps every candidate: the search is exact
    ids, scores = beam_search(model, tokens, beam_size=64, max_length=max_length,
                              length_penalty=length_penalty)
    for b in range(3):
        best, best_score = exhaustive_best(model, tokens[b], max_length, length_penalty)
        assert strip(ids[b]) == best
        assert scores[b].item() == pytest.approx(best_score, abs=1e-4)


def test_scores_are_the_length_normalised_sum_of_logprobs():
    model = tiny_model(seed=3)
    tokens = image_tokens(model, 4)
    for beam_size, length_penalty in [(1, 1.0), (3, 0.6), (2, 0.0)]:
        ids, scores = beam_search(model, tokens, beam_size, max_length=7, length_penalty=length_penalty)
        for b in range(4):
            caption = strip(ids[b])
            expected = sequence_logprob(model, tokens[b], caption) / len(caption) ** length_penalty
            assert scores[b].item() == pytest.approx(expected, abs=1e-4)


def greedy(model, tokens, max_length):
    """Plain greedy decoding without cache: argmax until EOS, EOS forced at max_length."""
    caption = []
    for step in range(max_length):
        logits = model(tokens[None], torch.tensor([[EOS] + caption]))[0][0, -1]
        token = EOS if step == max_length - 1 else int(logits.argmax())
        caption.append(token)
        if token == EOS:
            return caption
    return caption


def test_beam_size_one_is_greedy():
    model = tiny_model(seed=5)
    tokens = image_tokens(model, 8)
    ids, _ = beam_search(model, tokens, beam_size=1, max_length=9)
    for b in range(8):
        assert strip(ids[b]) == greedy(model, tokens[b], 9)


def test_batched_equals_one_by_one():
    model = tiny_model(seed=7)
    tokens = image_tokens(model, 5)
    for beam_size in (1, 3):
        ids, scores = beam_search(model, tokens, beam_size, max_length=10)
        for b in range(5):
            ids_b, scores_b = beam_search(model, tokens[b:b + 1], beam_size, max_length=10)
            assert strip(ids[b]) == strip(ids_b[0])
            assert scores[b].item() == pytest.approx(scores_b[0].item(), abs=1e-5)


def test_beam_scores_at_least_greedy():
    model = tiny_model(seed=11)
    with torch.no_grad():  # make an immediate EOS less attractive, so that captions have some length
        model.decoder.lm_head.weight[EOS] *= 0.2
    tokens = image_tokens(model, 16)
    _, greedy_scores = beam_search(model, tokens, 1, max_length=8)
    for beam_size in (2, 4, 16):
        _, scores = beam_search(model, tokens, beam_size, max_length=8)
        assert (scores >= greedy_scores - 1e-5).all()
    assert (scores > greedy_scores + 1e-4).any()  # and the wide beam does find better captions


def test_max_length_respected_and_every_caption_ends_with_eos():
    model = tiny_model(seed=13)
    with torch.no_grad():  # make EOS very unlikely, so captions run to the limit
        model.decoder.lm_head.weight[EOS] = -model.decoder.lm_head.weight[:EOS].sum(0)
        model.decoder.transformer.ln_f.bias.zero_()
    tokens = image_tokens(model, 4)
    for beam_size in (1, 3):
        ids, _ = beam_search(model, tokens, beam_size, max_length=5)
        assert ids.shape[1] <= 5
        for row in ids:
            assert EOS in row.tolist()


def test_finished_captions_stay_finished_and_do_not_change_the_model_mode():
    model = tiny_model(seed=17)
    tokens = image_tokens(model, 6)
    ids, _ = beam_search(model, tokens, beam_size=4, max_length=12)
    for row in ids.tolist():
        first_eos = row.index(EOS)
        assert all(t == EOS for t in row[first_eos:])  # nothing after EOS but padding
    model.train()
    beam_search(model, tokens, beam_size=2, max_length=4)
    assert model.training  # decoding leaves the mode to its caller


def test_bad_sizes_are_errors_not_asserts():
    model = tiny_model()
    for beam_size, max_length in ((0, 5), (2, 0)):
        with pytest.raises(ValueError, match="beam_size and max_length must be at least 1"):
            beam_search(model, image_tokens(model, 1), beam_size, max_length)
