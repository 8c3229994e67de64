"""BLEU under three protocols: references score 1 against themselves, our PTB tokens are Stanford's, the
original's protocol is BLEU with the shortest reference. tests/test_metrics.py checks the COCO protocol
against pycocoevalcap's Java pipeline."""
import json
import os

import pytest
from sacrebleu.metrics import BLEU

from evaluate import bleu4_original, bleu4_sacrebleu, coco_metrics, coco_tokenize

COCO_MINI = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "coco-mini", "dataset_coco.json")


def coco_mini_captions(split="val"):
    if not os.path.isfile(COCO_MINI):
        pytest.skip(f"{COCO_MINI} is not here")
    with open(COCO_MINI) as f:
        images = json.load(f)["images"]
    return [[s["raw"] for s in image["sentences"]] for image in images if image["split"] == split]


@pytest.fixture(scope="module")
def gpt2_tokenizer(small_decoder_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(small_decoder_dir)


def test_references_score_one_against_themselves(gpt2_tokenizer):
    references = coco_mini_captions()[:100]
    hypotheses = [refs[0] for refs in references]
    assert coco_metrics(hypotheses, references)[0]["bleu4"] == pytest.approx(1.0)
    assert bleu4_sacrebleu(hypotheses, references)[0] == pytest.approx(1.0)
    assert bleu4_original(hypotheses, references, gpt2_tokenizer) == pytest.approx(1.0)


def test_unrelated_captions_score_low_and_a_signature_is_given():
    references = coco_mini_captions()[:100]
    hypotheses = [refs[0] for refs in references[1:] + references[:1]]  # each image gets another's caption
    assert coco_metrics(hypotheses, references)[0]["bleu4"] < 0.15
    score, signature = bleu4_sacrebleu(hypotheses, references)
    assert score < 0.15 and "nrefs:var" in signature and "tok:13a" in signature


@pytest.mark.parametrize("text, tokens", [
    ("A man's (red) shirt, isn't it?", "a man 's -lrb- red -rrb- shirt is n't it"),
    ('Two dogs -- "playing" in the U.S. park.', "two dogs playing in the u.s. park"),
    ("a t-shirt at 3:30 p.m. costs $1,000.50!", "a t-shirt at 3:30 p.m. costs $ 1,000.50"),
    ("Mr. Smith's cat... can't; won't: 'quoted'", "mr. smith 's cat ca n't wo n't quoted"),
    ("they're we'll I'd I'm", "they 're we 'll i 'd i 'm"),
    ("\u201cA dog\u2019s\u201d \u2018toy\u2019 \u2014 1950's\u2026", "a dog 's toy 1950 's"),
    ("Wow!! what?! hi?there the letter a. I. The end", "wow !! what ?! hi?there the letter a. i the end"),
    ("x... the '90s 'em y'all", "x. the '90s 'em y' all"),
])
def test_coco_tokenization_matches_stanford_ptb(text, tokens):
    assert " ".join(coco_tokenize(text)) == tokens  # outputs of pycocoevalcap's Java PTBTokenizer


def test_seed_protocol_is_sacrebleu_on_bpe_pieces_with_one_reference(gpt2_tokenizer):
    # with one reference per image the shortest reference is the closest, and sacrebleu can score the pieces
    captions = coco_mini_captions()[:200]
    references = [[refs[0]] for refs in captions]
    hypotheses = [" ".join(refs[1].split()[:-1]) for refs in captions]  # another caption of the image, cut
    pieces = [" ".join(gpt2_tokenizer.tokenize(h)) for h in hypotheses]
    streams = [[" ".join(gpt2_tokenizer.tokenize(refs[0])) for refs in references]]
    theirs = BLEU(tokenize="none", smooth_method="none").corpus_score(pieces, streams).score / 100
    assert 0.02 < theirs < 0.5
    assert bleu4_original(hypotheses, references, gpt2_tokenizer) == pytest.approx(theirs, abs=1e-9)


def test_seed_protocol_uses_the_shortest_reference(gpt2_tokenizer):
    # 4 pieces matching exactly; references of 6 and 8 pieces: brevity penalty exp(1 - 6/4) with the shortest
    hypothesis = "a b c d"
    references = [["a b c d e f", "a b c d e f g h"]]
    assert bleu4_original([hypothesis], references, gpt2_tokenizer) == pytest.approx(0.6065306597, rel=1e-6)
