"""
Decode a split with a trained model and score it with the COCO caption metrics, one table row per beam size.

    python evaluate.py --checkpoint out/model.pt --data-dir data/coco --split test --beam-size 1 2 3 4

BLEU-1..4, METEOR, ROUGE-L and CIDEr-D follow the COCO caption protocol that papers report: captions are
lowercased and PTB-tokenized, punctuation is removed, and pycocoevalcap's scorers score the tokens. Our Python
PTB tokenizer stands in for pycocoevalcap's Java one (tests check that they agree), so only METEOR needs java;
without java on PATH, METEOR is reported as absent. Two more BLEU-4 figures, on the same captions:
  bleu4_sacrebleu  sacrebleu's default (13a tokenization, case kept), with its signature;
  bleu4_seed       the original clip-text-decoder's protocol, for comparison with its 0.323: GPT-2 BPE pieces
                   as tokens, case kept, shortest reference length.
All on a 0-1 scale but CIDEr-D (0-10, as the COCO server reports it). Writes OUT/metrics.json,
OUT/captions.jsonl (each caption with its CIDEr-D and BLEU-4) and OUT/gallery.html (OUT defaults to the
checkpoint's folder).
"""

import argparse
import base64
import html
import io
import json
import os
import random
import re
import shutil
import time
import zipfile

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from sacrebleu.metrics import BLEU

from captioner import (ArchiveError, atomic_write_text, caption_image_tokens, default_device, load_image,
                       load_model)
from data import IMAGE_ERRORS, default_cache_dir, read_karpathy, split_image_tokens

# ---------------------------------------------------------------------------------------------------------
# ---- PTB tokens ----

# pycocoevalcap runs Stanford's PTBTokenizer (Java, -lowerCase) and then drops these tokens. Brackets come
# out as -lrb- etc. in lower case, which that list (upper case) does not catch, so they stay, as here.
COCO_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
                    "--", "...", ";"}
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}
_BRACKET_NAMES = set(_BRACKETS.values())
# Stanford's tokenizer turns these into PTB's ASCII quotes, "..." and "--"
_UNICODE = {"\u201c": '"', "\u201d": '"', "\u2018": " ` ", "\u2019": "'", "\u2026": " ... ", "\u2013": " -- ",
            "\u2014": " -- "}
# a single letter and a period is an initial ("the letter a." keeps "a."), as in Stanford's lexer
_ABBREVIATION = re.compile(r"^[a-z](\.[a-z])*\.$|^(mr|mrs|ms|dr|st|jr|sr|vs|etc|co|inc|ltd|mt|ft|no)\.$")
# Before one of these capitalised words a single letter and a period end a sentence ("letter I. The sign"),
# and Stanford's lexer splits the period off; elsewhere "i." stays whole
_STARTS = ("A About According Additionally After An As At But Earlier He Her Here However If In It Last Many "
           "More Now Once One Other Our She Since So Some Such That The Their Then There These They This We "
           "When While What Yet You").split()
_SENTENCE_END = re.compile(r"(?<![\w.])([A-Za-z])\.(?=\s+(?:(?:%s)(?=\s|$)|M[rs]\.))"
                           % "|".join(f"{w[0]}(?i:{w[1:]})" for w in _STARTS))
# a clitic standing alone ("dog 's"), 'em, 'n and '90s keep their apostrophe
_CLITIC = re.compile(r"(n't|'(s|re|ll|d|m|ve|em|n|\d+s?))(?![a-z0-9])")
_CONTRACTION = re.compile(r"(?<=[a-z0-9])(n't|'s|'re|'ll|'d|'m|'ve)$")  # 1950's -> 1950 's
_SPECIAL = {"can't": ["ca", "n't"], "won't": ["wo", "n't"], "cannot": ["can", "not"], "gonna": ["gon", "na"],
            "wanna": ["wan", "na"], "gotta": ["got", "ta"], "y'all": ["y'", "all"]}


# "?" and "!" split off, a run of them as one token ("!!" is not in COCO's list, so it stays), except a single
# one between letters ("hi?there"), as in Stanford's lexer. [^\W\d_] is a letter.
_MARKS = re.compile(r"(?<![^\W\d_])[!?]+|[!?]{2,}|[!?](?![^\W\d_])")


def coco_tokenize(text: str) -> list[str]:
    """PTB-style tokens of a caption as the COCO caption evaluation sees them: lowercased, clitics split
    ("isn't" -> "is n't"), punctuation tokens removed. A Python reading of Stanford's PTBTokenizer for
    caption text; tests check it against pycocoevalcap's Java tokenizer on every coco-mini caption."""
    text = _SENTENCE_END.sub(r"\1 .", text).lower()
    for char, ascii_text in _UNICODE.items():
        text = text.replace(char, ascii_text)
    text = text.replace('"', " '' ")
    for bracket, name in _BRACKETS.items():
        text = text.replace(bracket, f" {name} ")
    text = re.sub(r"(?<!\w)([a-z])\.(?=\.)", r"\1. ", text)  # "x..." -> "x." and dots
    text = re.sub(r"(\.\.\.|--|[;$#&%@])", r" \1 ", text)
    text = _MARKS.sub(r" \g<0> ", text)
    text = re.sub(r"(\d)(am|pm)\b", r"\1 \2", text)  # 5:54pm -> 5:54 pm
    # a comma or colon splits unless it sits between digits (1,000 and 3:30 stay whole)
    text = re.sub(r"(?<!\d)([,:])|([,:])(?!\d)", lambda m: f" {m.group(0)} ", text)
    tokens = []
    for word in text.split():
        if word in _BRACKET_NAMES:
            tokens.append(word)
            continue
        leading = []
        while word[:1] in ("'", "`", ".", "-") and len(word) > 1 and not _CLITIC.match(word):
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


# ---------------------------------------------------------------------------------------------------------
# ---- COCO caption metrics ----

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


def bleu4_coco(hypotheses: list[str], references: list[list[str]]) -> float:
    """BLEU-4 (0-1) under the COCO caption protocol: pycocoevalcap's Bleu(4) on our PTB tokens."""
    return float(Bleu(4).compute_score(*_coco_inputs(hypotheses, references), verbose=0)[0][3])


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


def bleu4_seed(hypotheses: list[str], references: list[list[str]], tokenizer) -> float:
    """The original's figure: corpus BLEU-4 on GPT-2 BPE pieces (case kept) with the shortest reference
    length, an option of pycocoevalcap's BleuScorer (its Bleu fixes the closest). The scorer splits at
    whitespace, so each piece goes in as its token id."""
    scorer = BleuScorer(n=4)
    for hypothesis, refs in zip(hypotheses, references):
        ids = [" ".join(map(str, tokenizer.encode(t, add_special_tokens=False))) for t in [hypothesis, *refs]]
        scorer += (ids[0], ids[1:])
    return float(scorer.compute_score(option="shortest")[0][3])


# ---------------------------------------------------------------------------------------------------------
# ---- the table and the gallery ----

COLUMNS = [("beam size", "beam_size", "{}"), ("BLEU-1", "bleu1", "{:.3f}"), ("BLEU-2", "bleu2", "{:.3f}"),
           ("BLEU-3", "bleu3", "{:.3f}"), ("BLEU-4", "bleu4_coco", "{:.3f}"), ("METEOR", "meteor", "{:.3f}"),
           ("ROUGE-L", "rouge_l", "{:.3f}"), ("CIDEr-D", "cider_d", "{:.3f}"),
           ("BLEU-4 (sacrebleu)", "bleu4_sacrebleu", "{:.3f}"),
           ("BLEU-4 (original's protocol)", "bleu4_seed", "{:.3f}"), ("seconds", "seconds", "{:.1f}")]


def table_rows(results: list[dict]) -> list[list[str]]:
    """The metric table as text cells, the header first; an absent figure (METEOR without java) is n/a."""
    return [[name for name, _, _ in COLUMNS]] + [
        ["n/a" if r[key] is None else form.format(r[key]) for _, key, form in COLUMNS] for r in results]


def thumbnail(source, archives: dict, size: int = 256) -> str | None:
    """A JPEG data: URI of the image (a file or a zip member), longest side `size` px; None if unreadable."""
    try:
        image = source.path
        if source.zip_path:
            if source.zip_path not in archives:
                archives[source.zip_path] = zipfile.ZipFile(source.zip_path)
            image = io.BytesIO(archives[source.zip_path].read(source.member))
        image = load_image(image)
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    except (*IMAGE_ERRORS, KeyError):  # KeyError: not in the zip; a page of the others is still worth having
        return None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


STYLE = """body{font:14px/1.4 sans-serif;margin:16px;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}th{white-space:nowrap}input{display:none}
label{display:inline-block;padding:6px 14px;margin:12px 4px 8px 0;border:1px solid #888;cursor:pointer}
input:checked+label{background:#333;color:#fff}.view{display:none}
#best:checked~#view-best,#worst:checked~#view-worst,#random:checked~#view-random{display:grid}
.view{grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.card{border:1px solid #ccc;padding:8px}.card img{max-width:256px;max-height:256px;display:block}
.missing{width:256px;height:96px;background:#eee;color:#666;display:flex;align-items:center}
.refs{color:#555;margin:4px 0 0 18px;padding:0}"""


def write_gallery(path: str, items, results: list[dict], captions: list[list[str]], per_image: list[dict],
                  count: int, header: str):
    """gallery.html: `count` images per view (best, worst and a random sample, by the CIDEr-D of the beam size
    with the best corpus CIDEr-D), each with its thumbnail, its caption and scores at every beam size and its
    references. One self-contained file: thumbnails inline, no scripts, nothing fetched."""
    e = html.escape
    rank = max(range(len(results)), key=lambda b: results[b]["cider_d"])
    cider = per_image[rank]["cider_d"]
    views = {"best": sorted(range(len(items)), key=lambda i: (-cider[i], i))[:count],
             "worst": sorted(range(len(items)), key=lambda i: (cider[i], i))[:count],
             "random": random.Random(0).sample(range(len(items)), min(count, len(items)))}
    archives, thumbnails = {}, {}
    for i in dict.fromkeys(i for shown in views.values() for i in shown):
        thumbnails[i] = thumbnail(items[i].source, archives)
    for archive in archives.values():
        archive.close()
    rows = table_rows(results)
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(header)}</title>"
             f"<style>{STYLE}</style></head><body><h2>{e(header)}</h2><table>",
             "<tr>" + "".join(f"<th>{e(c)}</th>" for c in rows[0]) + "</tr>",
             *("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows[1:]),
             f"</table><p>Views sorted by each image's CIDEr-D at beam size {results[rank]['beam_size']}; "
             f"the random sample is fixed (seed 0).</p>"]
    parts += [f"<input type=radio name=view id={v}{' checked' if v == 'best' else ''}>"
              f"<label for={v}>{v} {len(shown)}</label>" for v, shown in views.items()]
    for view, shown in views.items():
        parts.append(f"<section class=view id=view-{view}>")
        for i in shown:
            item, uri = items[i], thumbnails[i]
            picture = (f"<img src=\"{uri}\" alt=\"{e(item.filename)}\">" if uri else
                       f"<div class=missing>{e(item.filename)}: cannot read the image</div>")
            lines = "".join(f"<tr><td>{r['beam_size']}</td><td>{e(captions[b][i])}</td><td>"
                            f"{per_image[b]['cider_d'][i]:.2f}</td><td>{per_image[b]['bleu4'][i]:.2f}</td>"
                            f"</tr>" for b, r in enumerate(results))
            refs = "".join(f"<li>{e(r)}</li>" for r in item.captions)
            parts.append(f"<div class=card>{picture}<b>{e(item.filename)}</b> (cocoid {e(str(item.cocoid))})"
                         f"<table><tr><th>beam</th><th>caption</th><th>CIDEr-D</th><th>BLEU-4</th></tr>"
                         f"{lines}</table><ol class=refs>{refs}</ol></div>")
        parts.append("</section>")
    atomic_write_text(path, "\n".join(parts + ["</body></html>\n"]))


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

def get_args_parser():
    parser = argparse.ArgumentParser("Decode a split and score it with the COCO caption metrics")
    parser.add_argument("--checkpoint", default="out/model.pt", help="model archive written by train.py")
    parser.add_argument("--data-dir", default="data/coco",
                        help="folder with a Karpathy-format dataset_coco.json")
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
                                                        "go (default: the checkpoint's folder)")
    parser.add_argument("--gallery", type=int, default=36,
                        help="images per view (best, worst, random) in gallery.html; 0: no gallery")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    return parser


def main(args):
    if min(args.beam_size) < 1 or args.max_length < 1 or args.batch_size < 1 or args.gallery < 0:
        raise SystemExit("error: --beam-size, --max-length and --batch-size must be at least 1, "
                         "--gallery at least 0")
    device = args.device or default_device()
    out_dir = args.out_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    model, tokenizer, archive = load_model(args.checkpoint)
    model.to(device).eval()
    config = model.config
    all_items = read_karpathy(args.data_dir, args.split)
    # The backbone runs as it did for the training images (the run's recorded precision). An image that
    # cannot be read has no caption to score: it is left out, named in meta["unreadable_file"] and counted in
    # metrics.json, so that a figure on fewer images is never mistaken for the full split.
    items, image_tokens, meta = split_image_tokens(
        all_items, args.split, config.vision_backbone, config.image_grid,
        args.cache_dir or default_cache_dir(), device, archive["metadata"].get("embedding_precision", "32"),
        args.num_workers)
    all_images = len(all_items)
    if meta["preprocessing"] != archive["preprocessing"]:
        raise SystemExit(f"error: the cached embeddings were made with preprocessing "
                         f"{meta['preprocessing']}, the model was trained with {archive['preprocessing']}")
    references = [item.captions for item in items]
    meteor = meteor_scorer()  # its Java process loads while we decode
    print(f"{args.split}: {len(items)} images, model {args.checkpoint} ({config.vision_backbone}, "
          f"{config.num_image_tokens} image tokens, {config.language_model}), {device}"
          f"{'' if meteor else '; no java on PATH, so no METEOR'}")

    results, lines, all_captions, per_image = [], [], [], []
    for beam_size in args.beam_size:
        start = time.time()
        captions = caption_image_tokens(model, tokenizer, image_tokens, beam_size, device, args.batch_size,
                                        args.max_length, args.length_penalty)
        seconds = time.time() - start
        corpus, scores = coco_metrics(captions, references, meteor)
        sacre, signature = bleu4_sacrebleu(captions, references)
        results.append({"beam_size": beam_size, "bleu1": corpus["bleu1"], "bleu2": corpus["bleu2"],
                        "bleu3": corpus["bleu3"], "bleu4_coco": corpus["bleu4"], "meteor": corpus["meteor"],
                        "rouge_l": corpus["rouge_l"], "cider_d": corpus["cider_d"], "bleu4_sacrebleu": sacre,
                        "bleu4_seed": bleu4_seed(captions, references, tokenizer), "seconds": seconds})
        lines += [json.dumps({"cocoid": item.cocoid, "filename": item.filename, "beam_size": beam_size,
                              "caption": caption, "cider_d": cider, "bleu4": bleu})
                  for item, caption, cider, bleu in zip(items, captions, scores["cider_d"], scores["bleu4"])]
        all_captions.append(captions)
        per_image.append(scores)
    print(f"sacrebleu signature: {signature}")
    rows = table_rows(results)
    for row in rows[:1] + [["---"] * len(COLUMNS)] + rows[1:]:
        print("| " + " | ".join(row) + " |")
    os.makedirs(out_dir, exist_ok=True)
    metrics = {"split": args.split, "images": len(items), "unreadable_images": all_images - len(items),
               "unreadable_file": meta["unreadable_file"] if all_images > len(items) else None,
               "checkpoint": os.path.abspath(args.checkpoint), "data_dir": os.path.abspath(args.data_dir),
               "max_length": args.max_length, "length_penalty": args.length_penalty,
               "model": archive["metadata"], "sacrebleu_signature": signature, "results": results}
    atomic_write_text(os.path.join(out_dir, "metrics.json"), json.dumps(metrics, indent=1))
    atomic_write_text(os.path.join(out_dir, "captions.jsonl"), "\n".join(lines) + "\n")
    written = ["metrics.json", "captions.jsonl"]
    if args.gallery:
        header = f"{args.split}: {len(items)} images, {os.path.abspath(args.checkpoint)}"
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
