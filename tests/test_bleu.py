"""BLEU under three protocols: the COCO protocol agrees with pycocoevalcap, references score 1 against themselves."""
import json
import os
import shutil

import pytest
from sacrebleu.metrics import BLEU

from evaluate import _ngram_statistics, bleu4_coco, bleu4_sacrebleu, bleu4_seed, coco_tokenize

COCO_MINI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "coco-mini", "dataset_coco.json")


def coco_mini_captions(split="val"):
    if not os.path.isfile(COCO_MINI):
        pytest.skip(f"{COCO_MINI} is not here")
    with open(COCO_MINI) as f:
        return [[s["raw"] for s in image["sentences"]] for image in json.load(f)["images"] if image["split"] == split]


@pytest.fixture(scope="module")
def gpt2_tokenizer(small_decoder_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(small_decoder_dir)


def test_references_score_one_against_themselves(gpt2_tokenizer):
    references = coco_mini_captions()[:100]
    hypotheses = [refs[0] for refs in references]
    assert bleu4_coco(hypotheses, references) == pytest.approx(1.0)
    assert bleu4_sacrebleu(hypotheses, references)[0] == pytest.approx(1.0)
    assert bleu4_seed(hypotheses, references, gpt2_tokenizer) == pytest.approx(1.0)


def test_unrelated_captions_score_low_and_a_signature_is_given():
    references = coco_mini_captions()[:100]
    hypotheses = [refs[0] for refs in references[1:] + references[:1]]  # each image gets another's caption
    assert bleu4_coco(hypotheses, references) < 0.15
    score, signature = bleu4_sacrebleu(hypotheses, references)
    assert score < 0.15 and "nrefs:var" in signature and "tok:13a" in signature


@pytest.mark.parametrize("text, tokens", [
    ("A man's (red) shirt, isn't it?", "a man 's -lrb- red -rrb- shirt is n't it"),
    ('Two dogs -- "playing" in the U.S. park.', "two dogs playing in the u.s. park"),
    ("a t-shirt at 3:30 p.m. costs $1,000.50!", "a t-shirt at 3:30 p.m. costs $ 1,000.50"),
    ("Mr. Smith's cat... can't; won't: 'quoted'", "mr. smith 's cat ca n't wo n't quoted"),
    ("they're we'll I'd I'm", "they 're we 'll i 'd i 'm"),
])
def test_coco_tokenization_matches_stanford_ptb(text, tokens):
    assert " ".join(coco_tokenize(text)) == tokens  # outputs of pycocoevalcap's Java PTBTokenizer


@pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap's PTB tokenizer needs java")
def test_coco_protocol_agrees_with_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    references = coco_mini_captions("val") + coco_mini_captions("test")
    # imperfect hypotheses: another image's caption, or a reference with its last words dropped
    hypotheses = [refs[0] if i % 3 else " ".join(references[i - 1][1].split()[:-2]) for i, refs in enumerate(references)]
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": r} for r in refs] for i, refs in enumerate(references)})
    res = tokenizer.tokenize({i: [{"caption": h}] for i, h in enumerate(hypotheses)})
    for i in gts:  # our tokenizer reproduces theirs token for token
        assert [" ".join(coco_tokenize(r)) for r in references[i]] == gts[i]
    scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
    ours = bleu4_coco(hypotheses, references)
    assert 0.2 < ours < 0.9
    assert ours == pytest.approx(scores[3], abs=1e-6)


def test_ngram_statistics_match_sacrebleu_with_closest_reference():
    references = coco_mini_captions()[:200]
    hypotheses = [" ".join(refs[1].lower().split()[:-1]) for refs in references[1:] + references[:1]]
    hyp_tokens = [h.split() for h in hypotheses]
    ref_tokens = [[r.split() for r in refs] for refs in references]
    correct, total, hyp_len, ref_len = _ngram_statistics(hyp_tokens, ref_tokens, "closest")
    ours = BLEU.compute_bleu(correct, total, hyp_len, ref_len, smooth_method="none").score
    streams = [[refs[k] if k < len(refs) else None for refs in references] for k in range(6)]
    theirs = BLEU(tokenize="none", smooth_method="none").corpus_score(hypotheses, streams).score
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_seed_protocol_uses_the_shortest_reference(gpt2_tokenizer):
    # 4 pieces matching exactly; references of 6 and 8 pieces: brevity penalty exp(1 - 6/4) with the shortest
    hypothesis = "a b c d"
    references = [["a b c d e f", "a b c d e f g h"]]
    assert bleu4_seed([hypothesis], references, gpt2_tokenizer) == pytest.approx(0.6065306597, rel=1e-6)
