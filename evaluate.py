"""
Decode a split with a trained model and score it with BLEU-4, one table row per beam size.

    python evaluate.py --checkpoint out/model.pt --data-dir data/coco --split test --beam-size 1 2 3 4

BLEU-4 is reported on a 0-1 scale three ways, on the same captions:
  bleu4_coco       the COCO caption protocol that papers report: lowercase, PTB tokenization, punctuation
                   removed, corpus BLEU with the closest reference length (agrees with pycocoevalcap's Bleu_4);
  bleu4_sacrebleu  sacrebleu's default (13a tokenization, case kept), with its signature;
  bleu4_seed       the original clip-text-decoder's protocol, for comparison with its 0.323: GPT-2 BPE pieces
                   as tokens, case kept, shortest reference length.
Writes OUT/metrics.json and OUT/captions.jsonl (OUT defaults to the checkpoint's folder).
"""

import argparse
import json
import os
import re
import time
from collections import Counter

from sacrebleu.metrics import BLEU

from captioner import ArchiveError, atomic_write_text, caption_image_tokens, default_device, load_model
from data import default_cache_dir, read_karpathy, split_image_tokens

# ---------------------------------------------------------------------------------------------------------
# ---- BLEU ----

# pycocoevalcap runs Stanford's PTBTokenizer (Java, -lowerCase) and then drops these tokens. Brackets come
# out as -lrb- etc. in lower case, which that list (upper case) does not catch, so they stay, as here.
COCO_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--",
                    "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_NAMES = set(_BRACKETS.values())
_ABBREVIATION = re.compile(r"^[a-z](\.[a-z])+\.?$|^(mr|mrs|ms|dr|st|jr|sr|vs|etc|co|inc|ltd|mt|ft|no)\.$")
_CLITIC = re.compile(r"n't|'(s|re|ll|d|m|ve)")  # a clitic standing alone ("dog 's") is kept whole
_CONTRACTION = re.compile(r"(?<=[a-z])(n't|'s|'re|'ll|'d|'m|'ve)$")
_SPECIAL = {"can't": ["ca", "n't"], "won't": ["wo", "n't"], "cannot": ["can", "not"], "gonna": ["gon", "na"],
            "wanna": ["wan", "na"], "gotta": ["got", "ta"]}


def coco_tokenize(text: str) -> list[str]:
    """PTB-style tokens of a caption as the COCO caption evaluation sees them: lowercased, clitics split
    ("isn't" -> "is n't"), punctuation tokens removed. A Python reading of Stanford's PTBTokenizer for
    caption text; tests check that BLEU on these tokens equals pycocoevalcap's."""
    text = text.lower().replace('"', " '' ")
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r"(\.\.\.|--|[;!?$#&%@])", r" \1 ", text)
    text = re.sub(r"(\d)(am|pm)\b", r"\1 \2", text)  # 5:54pm -> 5:54 pm
    # a comma or colon splits unless it sits between digits (1,000 and 3:30 stay whole)
    text = re.sub(r"(?<!\d)([,:])|([,:])(?!\d)", lambda m: f" {m.group(0)} ", text)
    tokens = []
    for word in text.split():
        if word in _BRACKET_NAMES:
            tokens.append(word)
            continue
        leading = []
        while word[:1] in ("'", "`", ".", "-") and len(word) > 1 and not _CLITIC.fullmatch(word):
            leading.append(word[0])
            word = word[1:]
        trailing = []
        while len(word) > 1 and word[-1] in ".'`-/" and not (word[-1] == "." and _ABBREVIATION.match(word)) \
                and not _CONTRACTION.search(word):
            trailing.insert(0, word[-1])
            word = word[:-1]
        pieces = _SPECIAL.get(word)
        if pieces is None:
            match = _CONTRACTION.search(word)
            pieces = [word[:match.start()], match.group(0)] if match else [word]
        tokens += leading + [p for p in pieces if p] + trailing
    return [t for t in tokens if t not in COCO_PUNCTUATION]


def _ngram_statistics(hypotheses, references, ref_length: str, max_order: int = 4):
    """Corpus BLEU sufficient statistics from token lists: n-gram matches and totals per order (clipped by
    the most frequent occurrence in any reference), hypothesis length, reference length."""
    correct, total = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hyp, refs in zip(hypotheses, references):
        hyp_len += len(hyp)
        lengths = [len(r) for r in refs]
        if ref_length == "shortest":
            ref_len += min(lengths)
        else:  # closest, ties to the shorter one, as pycocoevalcap and sacrebleu do
            ref_len += min(lengths, key=lambda n: (abs(n - len(hyp)), n))
        for n in range(1, max_order + 1):
            hyp_counts = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
            max_ref = Counter()
            for ref in refs:
                for gram, count in Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)).items():
                    max_ref[gram] = max(max_ref[gram], count)
            correct[n - 1] += sum(min(count, max_ref[gram]) for gram, count in hyp_counts.items())
            total[n - 1] += max(0, len(hyp) - n + 1)
    return correct, total, hyp_len, ref_len


def _sacrebleu_references(references):
    """Per-image reference lists -> sacrebleu's reference streams; images with fewer references get None."""
    most = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]


def bleu4_coco(hypotheses: list[str], references: list[list[str]]) -> float:
    """BLEU-4 (0-1) under the COCO caption protocol, computed by sacrebleu on PTB-normalised text."""
    hyps = [" ".join(coco_tokenize(h)) for h in hypotheses]
    refs = [[" ".join(coco_tokenize(r)) for r in rs] for rs in references]
    bleu = BLEU(tokenize="none", smooth_method="none", force=True)
    return bleu.corpus_score(hyps, _sacrebleu_references(refs)).score / 100


def bleu4_sacrebleu(hypotheses: list[str], references: list[list[str]]) -> tuple[float, str]:
    """sacrebleu's default BLEU (0-1) and its signature."""
    bleu = BLEU()
    score = bleu.corpus_score(hypotheses, _sacrebleu_references(references)).score / 100
    return score, str(bleu.get_signature())


def bleu4_seed(hypotheses: list[str], references: list[list[str]], tokenizer) -> float:
    """The original's figure: BLEU-4 on GPT-2 BPE pieces (case kept) with the shortest reference length.
    sacrebleu's BLEU has no shortest-reference option, so we count the n-grams and let sacrebleu combine."""
    hyps = [tokenizer.tokenize(h) for h in hypotheses]
    refs = [[tokenizer.tokenize(r) for r in rs] for rs in references]
    correct, total, hyp_len, ref_len = _ngram_statistics(hyps, refs, "shortest")
    return BLEU.compute_bleu(correct, total, hyp_len, ref_len, smooth_method="none").score / 100


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

def get_args_parser():
    parser = argparse.ArgumentParser("Decode a split and score it with BLEU-4", add_help=True)
    parser.add_argument("--checkpoint", default="out/model.pt", help="model archive written by train.py")
    parser.add_argument("--data-dir", default="data/coco", help="folder with a Karpathy-format dataset_coco.json")
    parser.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to caption")
    parser.add_argument("--beam-size", type=int, nargs="+", default=[1], help="one or more beam sizes; 1 = greedy")
    parser.add_argument("--max-length", type=int, default=30, help="most tokens per caption, EOS included")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="final score = sum of log-probs / length**length_penalty")
    parser.add_argument("--batch-size", type=int, default=128, help="images decoded together")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: as train.py)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding workers for embedding (default: CPU cores, at most 8)")
    parser.add_argument("--out-dir", default=None, help="where metrics.json and captions.jsonl go "
                                                        "(default: the checkpoint's folder)")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    return parser


def main(args):
    if min(args.beam_size) < 1 or args.max_length < 1 or args.batch_size < 1:
        raise SystemExit("error: --beam-size, --max-length and --batch-size must be at least 1")
    device = args.device or default_device()
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    model, tokenizer, archive = load_model(args.checkpoint)
    model.to(device).eval()
    config = model.config
    all_items = read_karpathy(args.data_dir, args.split)
    # The backbone runs as it did for the training images (fp16 autocast on CUDA, by default). An image that
    # cannot be read has no caption to score: it is left out, named in meta["unreadable_file"] and counted in
    # metrics.json, so that a figure on fewer images is never mistaken for the full split.
    items, image_tokens, meta = split_image_tokens(
        all_items, args.split, config.vision_backbone, config.image_grid, args.cache_dir or default_cache_dir(),
        device, archive["metadata"].get("embedding_precision", "32"), args.num_workers)
    all_images = len(all_items)
    if meta["preprocessing"] != archive["preprocessing"]:
        raise SystemExit(f"error: the cached embeddings were made with preprocessing {meta['preprocessing']}, "
                         f"the model was trained with {archive['preprocessing']}")
    references = [item.captions for item in items]
    print(f"{args.split}: {len(items)} images, model {args.checkpoint} "
          f"({config.vision_backbone}, {config.num_image_tokens} image tokens, {config.language_model}), {device}")

    results, lines = [], []
    for beam_size in args.beam_size:
        start = time.time()
        captions = caption_image_tokens(model, tokenizer, image_tokens, beam_size, device, args.batch_size,
                                        args.max_length, args.length_penalty)
        seconds = time.time() - start
        sacre, signature = bleu4_sacrebleu(captions, references)
        results.append({"beam_size": beam_size, "bleu4_coco": bleu4_coco(captions, references),
                        "bleu4_sacrebleu": sacre, "bleu4_seed": bleu4_seed(captions, references, tokenizer),
                        "seconds": seconds})
        lines += [json.dumps({"cocoid": item.cocoid, "filename": item.filename, "beam_size": beam_size,
                              "caption": caption}) for item, caption in zip(items, captions)]
    print(f"sacrebleu signature: {signature}")
    print("| beam size | BLEU-4 (COCO protocol) | BLEU-4 (sacrebleu) | BLEU-4 (original's protocol) | seconds |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['beam_size']} | {r['bleu4_coco']:.3f} | {r['bleu4_sacrebleu']:.3f} | {r['bleu4_seed']:.3f} "
              f"| {r['seconds']:.1f} |")
    os.makedirs(out_dir, exist_ok=True)
    metrics = {"split": args.split, "images": len(items), "unreadable_images": all_images - len(items),
               "unreadable_file": meta["unreadable_file"] if all_images > len(items) else None, "checkpoint": os.path.abspath(args.checkpoint),
               "data_dir": os.path.abspath(args.data_dir), "max_length": args.max_length,
               "length_penalty": args.length_penalty, "model": archive["metadata"],
               "sacrebleu_signature": signature, "results": results}
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1))
    atomic_write_text(os.path.join(out_dir, "captions.jsonl"), "\n".join(lines) + "\n")
    print(f"wrote {out_dir}/metrics.json and {out_dir}/captions.jsonl")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (ArchiveError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
