"""
Decode a split with a trained model and score it with the COCO caption metrics, one table row per beam size.

    python evaluate.py --checkpoint out/model --data-dir data/coco --split test --beam-size 1 2 3 4

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D follow the COCO caption protocol that papers report: captions are
lowercased and PTB-tokenized, punctuation is removed, and pycocoevalcap's scorers score the tokens. Our Python
PTB tokenizer (support/ptb_tokenizer.py) stands in for pycocoevalcap's Java one (tests check that they
agree), so only METEOR needs java; without java on PATH, METEOR is reported as absent. Two more BLEU-4
figures, on the same captions:
  bleu4_sacrebleu  sacrebleu's default (13a tokenization, case kept), with its signature;
  bleu4_original   the original clip-text-decoder's protocol, for comparison with its 0.323: GPT-2 BPE
                   pieces as tokens, case kept, shortest reference length.
All on a 0-1 scale but CIDEr-D (0-10, as the COCO server reports it). Writes OUT/metrics.json,
OUT/captions.jsonl (each caption with its CIDEr-D and BLEU-4) and OUT/gallery.html (support/report.py; OUT
defaults to the checkpoint's folder).
"""

import argparse
import json
import os
import shutil
import time

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from sacrebleu.metrics import BLEU

from captioner import ArchiveError, caption_image_tokens, default_device, images_per_batch, load_model
from data import default_cache_dir, read_split, split_image_tokens
from support.files import atomic_write_text, check_writable
from support.flags import add_share_arguments
from support.ptb_tokenizer import coco_tokenize
from support.report import COLUMNS, table_rows, write_gallery

# ---------------------------------------------------------------------------------------------------------
# ---- the COCO caption metrics ----

def coco_metrics(hypotheses: list[str], references: list[list[str]], meteor=None) -> tuple[dict, dict]:
    """-> (corpus, per_image). corpus: bleu1..bleu4, meteor (None without a scorer from meteor_scorer()),
    rouge_l, cider_d of one caption per image against its references; per_image: each caption's cider_d and
    bleu4 (pycocoevalcap's sentence BLEU, nearly 0 without a matching 4-gram)."""
    gts, res = _coco_inputs(hypotheses, references)
    bleu, bleu_images = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    # pycocoevalcap's Cider is CIDEr-D, the COCO server's CIDEr: tf-idf n-gram vectors with clipped counts, a
    # Gaussian length penalty (sigma 6), x10. Document frequencies come from the references of the images
    # scored (the standard COCO protocol), so a figure belongs to its image set; on one image it is 0.
    cider, cider_images = Cider().compute_score(gts, res)
    corpus = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
    if meteor is not None:
        try:  # its protocol separates fields with "|||"; it strips that from captions only
            clean = {i: [r.replace("|||", "") for r in refs] for i, refs in gts.items()}
            meteor = float(meteor.compute_score(clean, res)[0])
        except (OSError, ValueError) as e:  # the Java process died: keep the other figures
            if meteor.lock.locked():  # pycocoevalcap keeps it on failure; its __del__ would wait forever
                meteor.lock.release()
            print(f"warning: METEOR failed ({type(e).__name__}: {e}); it is reported as absent")
            meteor = None
    corpus.update(meteor=meteor, rouge_l=float(rouge), cider_d=float(cider))
    return corpus, {"cider_d": list(map(float, cider_images)), "bleu4": list(map(float, bleu_images[3]))}


def _coco_inputs(hypotheses: list[str], references: list[list[str]]) -> tuple[dict, dict]:
    """-> (gts, res) as pycocoevalcap's scorers take them: {image index: [space-joined PTB tokens, ...]}."""
    if len(hypotheses) != len(references) or not hypotheses or not all(references):
        raise ValueError(f"{len(hypotheses)} captions for {len(references)} images: need one caption and at "
                         f"least one reference per image, and at least one image")
    gts = {i: [" ".join(coco_tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    # An empty caption stays "", which every scorer takes and scores 0; only ROUGE-L, splitting at " ", sees
    # one empty token and gives 1 against a reference that tokenizes to nothing too ("..."), as pycocoevalcap
    return gts, {i: [" ".join(coco_tokenize(h))] for i, h in enumerate(hypotheses)}


def meteor_scorer():
    """pycocoevalcap's METEOR, a Java process reused across calls (it takes seconds to load its paraphrase
    table), or None where java is not on PATH."""
    return Meteor() if shutil.which("java") else None


# ---------------------------------------------------------------------------------------------------------
# ---- BLEU-4 under other protocols ----

def _sacrebleu_references(references):
    """Per-image reference lists -> sacrebleu's reference streams; images with fewer references get None."""
    most = max(len(refs) for refs in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(most)]


def bleu4_sacrebleu(hypotheses: list[str], references: list[list[str]]) -> tuple[float, str]:
    """sacrebleu's default BLEU (0-1) and its signature."""
    bleu = BLEU()
    score = bleu.corpus_score(hypotheses, _sacrebleu_references(references)).score / 100
    return score, str(bleu.get_signature())


def bleu4_original(hypotheses: list[str], references: list[list[str]], tokenizer) -> float:
    """The original's figure: corpus BLEU-4 on GPT-2 BPE pieces (case kept) with the shortest reference
    length, an option of pycocoevalcap's BleuScorer (its Bleu fixes the closest). The scorer splits at
    whitespace, so each piece goes in as its token id."""
    scorer = BleuScorer(n=4)
    for hypothesis, refs in zip(hypotheses, references):
        ids = [" ".join(map(str, tokenizer.encode(t, add_special_tokens=False))) for t in [hypothesis, *refs]]
        scorer += (ids[0], ids[1:])
    return float(scorer.compute_score(option="shortest")[0][3])


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

def get_args_parser():
    parser = argparse.ArgumentParser("Decode a split and score it with the COCO caption metrics")
    parser.add_argument("--checkpoint", default="out/model",
                        help="the model: train.py's OUT/model folder, a Hub id, or an earlier release's model.pt")
    parser.add_argument("--data-dir", default="data/coco",
                        help="the dataset, in any layout train.py reads (its --help says which)")
    add_share_arguments(parser)
    parser.add_argument("--split", default="test", choices=["test", "val", "train"], help="split to caption")
    parser.add_argument("--beam-size", type=int, nargs="+", default=[1],
                        help="one or more beam sizes; 1 = greedy")
    parser.add_argument("--max-length", type=int, default=30, help="most tokens per caption, EOS included")
    parser.add_argument("--length-penalty", type=float, default=1.0,
                        help="final score = sum of log-probs / length**length_penalty")
    parser.add_argument("--batch-size", type=int, default=128, help="images decoded together")
    parser.add_argument("--cache-dir", default=None, help="embedding cache (default: as train.py)")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding workers for embedding (default: CPU cores, at most 8)")
    parser.add_argument("--out-dir", default=None, help="where metrics.json, captions.jsonl and gallery.html "
                                                        "go (default: beside the model; here for a Hub id)")
    parser.add_argument("--gallery", type=int, default=36,
                        help="images per view (best, worst, random) in gallery.html; 0: no gallery")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    return parser


def score_captions(captions, references, tokenizer, meteor) -> tuple[dict, dict, str]:
    """-> (the table row's figures, each caption's CIDEr-D and BLEU-4, sacrebleu's signature)."""
    corpus, per_image = coco_metrics(captions, references, meteor)
    sacre, signature = bleu4_sacrebleu(captions, references)
    figures = {**{key: corpus[key] for key in ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l",
                                               "cider_d")},
               "bleu4_sacrebleu": sacre, "bleu4_original": bleu4_original(captions, references, tokenizer)}
    return figures, per_image, signature


def caption_and_score(model, tokenizer, image_tokens, items, args, device, meteor):
    """Decode the split at each beam size and score it -> (the table's rows, captions.jsonl's lines, the
    captions and per-image scores of each beam size, sacrebleu's signature)."""
    results, lines, all_captions, per_image = [], [], [], []
    references = [item.captions for item in items]
    for beam_size in args.beam_size:
        start = time.time()
        captions = caption_image_tokens(model, tokenizer, image_tokens, beam_size, device, args.batch_size,
                                        args.max_length, args.length_penalty)
        seconds = time.time() - start
        figures, scores, signature = score_captions(captions, references, tokenizer, meteor)
        results.append({"beam_size": beam_size, **figures, "seconds": seconds})
        lines += [json.dumps({"cocoid": item.cocoid, "filename": item.filename, "beam_size": beam_size,
                              "caption": caption, "cider_d": cider, "bleu4": bleu})
                  for item, caption, cider, bleu in zip(items, captions, scores["cider_d"], scores["bleu4"])]
        all_captions.append(captions)
        per_image.append(scores)
    return results, lines, all_captions, per_image, signature


def main(args):
    if min(args.beam_size) < 1 or args.max_length < 1 or args.batch_size < 1 or args.gallery < 0:
        raise SystemExit("error: --beam-size, --max-length and --batch-size must be at least 1, "
                         "--gallery at least 0")
    device = args.device or default_device()
    out_dir = args.out_dir or (os.path.dirname(os.path.abspath(args.checkpoint))  # a Hub id: here
                               if os.path.exists(args.checkpoint) else ".")
    check_writable(out_dir, "--out-dir")  # now, not after decoding every beam size
    model_name = os.path.abspath(args.checkpoint) if os.path.exists(args.checkpoint) else args.checkpoint
    model, tokenizer, archive = load_model(args.checkpoint)
    model.to(device).eval()
    model.check_max_length(args.max_length)  # these two now, not after embedding the split
    for beam_size in args.beam_size:
        images_per_batch(model, beam_size, args.max_length, 1, device)
    config = model.config
    all_items = read_split(args.data_dir, args.split, args.val_share, args.test_share, need_captions=False)
    if not any(item.captions for item in all_items):
        raise SystemExit(f"error: {args.data_dir}: the {args.split} split has no captions to score against; "
                         f"caption its images with python captioner.py --checkpoint MODEL FOLDER")
    all_items = [item for item in all_items if item.captions]
    # The backbone runs as it did for the training images (the run's recorded precision). An image that
    # cannot be read has no caption to score: it is left out, named in meta["unreadable_file"] and counted in
    # metrics.json, so that a figure on fewer images is never mistaken for the full split.
    items, image_tokens, meta = split_image_tokens(
        all_items, args.split, config.vision_backbone, config.image_grid, args.cache_dir or default_cache_dir(),
        device=device, precision=archive["metadata"].get("embedding_precision", "32"),
        num_workers=args.num_workers)
    if meta["preprocessing"] != archive["preprocessing"]:
        raise SystemExit(f"error: the cached embeddings were made with preprocessing "
                         f"{meta['preprocessing']}, the model was trained with {archive['preprocessing']}")
    meteor = meteor_scorer()  # its Java process loads while we decode
    print(f"{args.split}: {len(items)} images, model {args.checkpoint} ({config.vision_backbone}, "
          f"{config.num_image_tokens} image tokens, {config.language_model}), {device}"
          f"{'' if meteor else '; no java on PATH, so no METEOR'}")

    results, lines, all_captions, per_image, signature = caption_and_score(model, tokenizer, image_tokens, items,
                                                                            args, device, meteor)
    print(f"sacrebleu signature: {signature}")
    rows = table_rows(results)
    for row in rows[:1] + [["---"] * len(COLUMNS)] + rows[1:]:
        print("| " + " | ".join(row) + " |")
    metrics = {"split": args.split, "images": len(items), "unreadable_images": len(all_items) - len(items),
               "unreadable_file": meta["unreadable_file"] if len(all_items) > len(items) else None,
               "checkpoint": model_name, "data_dir": os.path.abspath(args.data_dir),
               "max_length": args.max_length, "length_penalty": args.length_penalty,
               "model": archive["metadata"], "sacrebleu_signature": signature, "results": results}
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1))
    atomic_write_text(os.path.join(out_dir, "captions.jsonl"), "\n".join(lines) + "\n")
    written = ["metrics.json", "captions.jsonl"]
    if args.gallery:
        header = f"{args.split}: {len(items)} images, {model_name}"
        write_gallery(os.path.join(out_dir, "gallery.html"), items, results, all_captions, per_image,
                      args.gallery, header)
        written.append("gallery.html")
    print(f"wrote {', '.join(os.path.join(out_dir, name) for name in written)}")


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args)
    except (ArchiveError, OSError, ValueError) as e:  # OSError: a full disk, a read-only --out-dir
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("error: interrupted; an embedding resumes where it stopped") from None
