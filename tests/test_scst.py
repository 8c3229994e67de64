"""Self-critical training: the sampler's distribution, batching and log-probs (step by step and in one
teacher-forced pass); a step raises the reward; our CIDEr-D equals pycocoevalcap's; resume equals an
uninterrupted run; the flags."""
import itertools
import os
import random

import pytest
import torch
import torch.nn.functional as F
from pycocoevalcap.cider.cider import Cider

import scst
import train
from captioner import caption_logprobs, load_model, sample_captions
from conftest import EOS, VOCAB, image_tokens, read_log, run_train, tiny_model, train_argv
from data import read_split
from evaluate import coco_tokenize
from support.files import safe_torch_load

COCO_MINI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "coco-mini")


def teacher_forced(model, tokens, ids, temperature=1.0):
    """Per-token log-probs (N, L) of ids (N, L), EOS-padded, under softmax(logits / temperature)."""
    input_ids = torch.cat([torch.full((len(ids), 1), EOS), ids[:, :-1]], dim=1)
    logits, _ = model(tokens, input_ids)
    return F.log_softmax(logits.double() / temperature, dim=-1).gather(2, ids[:, :, None]).squeeze(2)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_tokens_follow_the_tempered_softmax(temperature):
    model = tiny_model()
    tokens = image_tokens(model, 1)
    with torch.no_grad():
        ids, _ = sample_captions(model, tokens, 20_000, 2, temperature, torch.Generator().manual_seed(0))
        expected = F.softmax(model(tokens, torch.tensor([[EOS]]))[0][0, 0] / temperature, dim=-1)
    observed = torch.bincount(ids[:, 0], minlength=VOCAB) / len(ids)
    assert 0.5 * (observed - expected).abs().sum() < 0.01  # total variation; ~0.004 expected from noise


def test_batched_sampling_equals_one_by_one():
    model = tiny_model(seed=1)
    tokens = image_tokens(model, 3)
    with torch.no_grad():
        ids, logprobs = sample_captions(model, tokens, 4, 6, 0.8, torch.Generator().manual_seed(5))
        generator = torch.Generator().manual_seed(5)  # one generator, the images in order
        alone = [sample_captions(model, tokens[b:b + 1], 4, 6, 0.8, generator) for b in range(3)]
    for b, (ids_b, logprobs_b) in enumerate(alone):
        assert ids[4 * b:4 * b + 4, :ids_b.shape[1]].tolist() == ids_b.tolist()
        assert (ids[4 * b:4 * b + 4, ids_b.shape[1]:] == EOS).all()
        torch.testing.assert_close(logprobs[4 * b:4 * b + 4], logprobs_b, rtol=1e-5, atol=1e-6)
    assert len({tuple(row) for row in ids.tolist()}) > 4  # the samples do differ


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_is_the_teacher_forced_sum(temperature):
    model, max_length = tiny_model(seed=2), 5
    tokens = image_tokens(model, 4).repeat_interleave(8, dim=0)  # (32, K, D), as the sampler repeats them
    ids, logprobs = sample_captions(model, tokens[::8], 8, max_length, temperature,
                                    torch.Generator().manual_seed(0))
    per_token = teacher_forced(model, tokens, ids, temperature)
    first_eos = (ids == EOS).int().argmax(dim=1, keepdim=True)  # (N, 1)
    position = torch.arange(ids.shape[1])[None]  # (1, L)
    # the words and a drawn EOS count; an EOS forced at max_length was not drawn and adds 0
    counted = (position < first_eos) | ((position == first_eos) & (first_eos < max_length - 1))
    expected = (per_token * counted).sum(dim=1)
    assert (first_eos == max_length - 1).any(), "no caption reached max_length: the forced EOS is untested"
    assert (first_eos < max_length - 2).any(), "every caption is long: the early EOS is untested"
    # the sampler's running sums (step by step, with the KV cache) and the one-pass scores that SCST
    # differentiates (only the counted tokens reach the output layer) both equal the full teacher-forced sum
    torch.testing.assert_close(logprobs.double(), expected, rtol=1e-5, atol=1e-5)
    rescored = caption_logprobs(model, tokens, ids, max_length, temperature)
    assert rescored.requires_grad
    torch.testing.assert_close(rescored.double(), expected, rtol=1e-5, atol=1e-5)


def test_an_scst_step_raises_the_expected_reward():
    """Reward 1 for a caption holding token 2: one step on 4 images x 16 samples raises the exact expected
    reward, summed over every caption the model can write, of every image."""
    model, max_length = tiny_model(seed=3), 4
    tokens = image_tokens(model, 4)
    captions = [list(words) + [EOS] for n in range(max_length)
                for words in itertools.product(range(VOCAB - 1), repeat=n)]

    def expected_reward():
        with torch.no_grad():
            ids = torch.tensor([c + [EOS] * (max_length - len(c)) for c in captions])  # (85, L)
            per_token = teacher_forced(model, tokens.repeat_interleave(len(ids), dim=0), ids.repeat(4, 1))
            keep = torch.tensor([[t < len(c) and t < max_length - 1 for t in range(max_length)]
                                 for c in captions]).repeat(4, 1)
            p = (per_token * keep).sum(dim=1).exp().view(4, len(captions))
            reward = torch.tensor([2 in c for c in captions], dtype=torch.double)
            assert torch.allclose(p.sum(dim=1), torch.ones(4, dtype=torch.double))
            return p @ reward  # (4,)

    before = expected_reward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    ids, _ = sample_captions(model, tokens, 16, max_length, 1.0, torch.Generator().manual_seed(0))
    logprobs = caption_logprobs(model, tokens.repeat_interleave(16, dim=0), ids, max_length)
    rewards = (ids == 2).any(dim=1).float().view(4, 16)
    loss = scst.policy_loss(logprobs.view(4, 16), rewards, scst.others_baseline(rewards)) / 64
    loss.backward()
    optimizer.step()
    after = expected_reward()
    assert (after > before).all(), (before, after)


def test_our_cider_d_equals_pycocoevalcaps_with_the_same_document_frequencies():
    if not os.path.isfile(os.path.join(COCO_MINI, "dataset_coco.json")):
        pytest.skip(f"{COCO_MINI} is not here")
    items = read_split(COCO_MINI, "val")[:200] + read_split(COCO_MINI, "test")[:100]
    references = [item.captions for item in items]
    rng = random.Random(0)
    # a held-out reference of the image itself, another image's caption, or a shuffled one
    hypotheses, kept = [], []
    for i, refs in enumerate(references):
        kind = i % 3
        hypotheses.append(refs[0] if kind == 0 else references[(i + 7) % len(references)][1] if kind == 1
                          else " ".join(rng.sample(refs[2].split(), len(refs[2].split()))))
        kept.append(refs[1:] if kind == 0 else refs)
    hypotheses[3] = ""  # an empty caption scores 0 in both
    ours = scst.CiderD(kept)
    gts = {i: [" ".join(coco_tokenize(r)) for r in refs] for i, refs in enumerate(kept)}
    res = {i: [" ".join(coco_tokenize(h))] for i, h in enumerate(hypotheses)}
    _, theirs = Cider().compute_score(gts, res)
    mine = [ours.scores(i, [h])[0] for i, h in enumerate(hypotheses)]
    assert mine == pytest.approx(list(theirs), abs=1e-6)
    assert min(mine) == 0.0 and max(mine) > 1.0


def run_scst(argv):
    parser = scst.get_args_parser()
    args = parser.parse_args(argv)
    scst.check_args(args, parser)
    scst.main(args)


def test_resume_equals_an_uninterrupted_run(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path,
                                            monkeypatch):
    # A one-epoch model's samples match no reference, and all-zero rewards would train nothing: reward the
    # samples' lengths instead, which vary, so that every step moves the weights
    monkeypatch.setattr(scst.CiderD, "scores", lambda self, image, texts: [len(t) % 10 / 10 for t in texts])
    cache = tmp_path / "cache"
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "ce", cache,
                         "--max-epochs", "1"))

    def argv(out, *extra):  # 16 images in windows of 3 x 2: 3 optimizer steps per epoch (6 + 6 + 4 images)
        return ["--checkpoint", str(tmp_path / "ce" / "model"), "--data-dir", tiny_dataset,
                "--cache-dir", str(cache), "--out-dir", str(tmp_path / out), "--batch-size", "3",
                "--accumulate-grad-batches", "2", "--samples-per-image", "3", "--max-epochs", "2",
                "--lr", "1e-2", "--max-length", "8",
                "--precision", "32", "--device", "cpu", "--log-interval", "1", "--num-workers", "0",
                "--checkpoint-every", "0", *extra]
    # the modes the policy samples and scores in: eval, the test-time policy, without dropout
    modes, sample_captions = [], scst.sample_captions
    monkeypatch.setattr(scst, "sample_captions",
                        lambda model, *a: modes.append(model.training) or sample_captions(model, *a))
    run_scst(argv("a"))
    assert modes and not any(modes)
    run_scst(argv("b", "--stop-after-steps", "2"))  # inside the first epoch
    run_scst(argv("b", "--resume", "--stop-after-steps", "2"))  # inside the second
    os.rename(tmp_path / "ce" / "model", tmp_path / "ce" / "moved")  # --resume needs checkpoint.pt only
    run_scst(argv("b", "--resume"))
    os.rename(tmp_path / "ce" / "moved", tmp_path / "ce" / "model")

    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    train_a = [(r["step"], r["loss"], r["reward"]) for r in log_a if r["type"] == "train"]
    train_b = [(r["step"], r["loss"], r["reward"]) for r in log_b if r["type"] == "train"]
    assert [s for s, _, _ in train_a] == [s for s, _, _ in train_b] == [1, 2, 3, 4, 5, 6]
    assert sum(train_b, ()) == pytest.approx(sum(train_a, ()), rel=1e-6, abs=1e-7)
    assert len({r for _, _, r in train_a}) > 1  # rewards vary: the samples are not all alike
    epochs_a = [(r["epoch"], r["val_cider_d"]) for r in log_a if r["type"] == "epoch"]
    assert [e for e, _ in epochs_a] == [-1, 0, 1]  # the start is measured too
    assert epochs_a == [(r["epoch"], r["val_cider_d"]) for r in log_b if r["type"] == "epoch"]
    final_a = safe_torch_load(str(tmp_path / "a" / "checkpoint.pt"))
    final_b = safe_torch_load(str(tmp_path / "b" / "checkpoint.pt"))
    for name, tensor in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][name], tensor, rtol=1e-6, atol=1e-7)
    assert final_a["state"] == final_b["state"]
    start = load_model(str(tmp_path / "ce" / "model"))[2]
    assert any(not torch.equal(start["state_dict"][k], v) for k, v in final_a["model"].items())
    model_pt = load_model(str(tmp_path / "a" / "model"))[2]
    assert model_pt["preprocessing"] == start["preprocessing"]
    assert model_pt["metadata"]["embedding_precision"] == start["metadata"]["embedding_precision"]
    # the paper's baseline, the greedy caption's reward, runs through the same loop
    modes.clear()
    run_scst(argv("g", "--baseline", "greedy", "--max-epochs", "1", "--stop-after-steps", "1"))
    assert [r["step"] for r in read_log(tmp_path / "g") if r["type"] == "train"] == [1]
    assert modes and not any(modes)


@pytest.mark.parametrize("argv, message", [
    (["--samples-per-image", "1"], "--baseline others needs --samples-per-image 2 or more"),
    (["--max-length", "1"], "--max-length must be at least 2"),
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--bleu-weight", "-1"], "--bleu-weight must be >= 0"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--stop-after-steps", "-1"], "--stop-after-steps must be 0 (off) or more"),
    (["--device", "gpu0"], "--device gpu0: not a device torch knows"),  # train.py's checks, shared
])
def test_bad_flags_are_refused(argv, message, capsys):
    parser = scst.get_args_parser()
    with pytest.raises(SystemExit):
        scst.check_args(parser.parse_args(argv), parser)
    assert message in capsys.readouterr().err


def test_shared_flags_keep_each_scripts_defaults():
    """scst.py takes train.py's flags with its own defaults, and changes none of train.py's."""
    scst_args, train_args = scst.get_args_parser().parse_args([]), train.get_args_parser().parse_args([])
    assert (scst_args.lr, scst_args.lr_schedule, scst_args.weight_decay, scst_args.out_dir) == \
        (5e-5, "constant", 0.0, "out/scst")
    assert (train_args.lr, train_args.lr_schedule, train_args.weight_decay, train_args.out_dir) == \
        (1e-4, "cosine", 0.01, "out")
    assert scst_args.max_length == train_args.max_length == 30


def test_the_bleu_weight_adds_sentence_bleu_to_the_reward():
    references = [["a dog runs on the grass", "a brown dog running in a field", "the dog is running outside"],
                  ["a plate of food on a table", "a dish with rice and meat", "food served on a white plate"]]
    cider = scst.CiderD(references)
    captions = ["a dog running on the grass", "a plate of food on a table"]
    plain = scst.caption_rewards(cider, references, 0, captions)
    assert plain == cider.scores(0, captions)
    mixed = scst.caption_rewards(cider, references, 0, captions, bleu_weight=0.5)
    bonus = [m - p for m, p in zip(mixed, plain)]
    assert bonus[0] > 0.1 and bonus[1] == pytest.approx(0.0, abs=0.05)  # the other image's caption scores ~0
    assert bonus[0] <= 0.5


def test_a_hub_id_stays_a_hub_id(tmp_path):
    parser = scst.get_args_parser()
    args = parser.parse_args(["--checkpoint", "someone/captioner", "--device", "cpu", "--out-dir", str(tmp_path)])
    scst.check_args(args, parser)
    assert args.checkpoint == "someone/captioner"  # not made into a path under the current folder
