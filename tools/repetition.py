"""Count repetition in the captions that evaluate.py wrote (DIR/captions.jsonl), per beam size, as a Markdown
table:

    python tools/repetition.py runs/scst ce/test scst/test     # RUNS_DIR, then each run's evaluation folder

A caption repeats a word pair when the same two consecutive PTB tokens (evaluate.coco_tokenize: lowercased,
punctuation removed) occur twice in it, overlapping or not: "a wave on a wave" ("a wave" twice), "a man and
a man". The pair can also be two function words ("standing on a car on a street"), so a second count
leaves those pairs out. Also counted: a word right after itself ("a a"), and a run of two or more punctuation
marks in the caption as written ("a beach...."), which the PTB tokens, and so every metric, do not see.
"""

import json
import os
import re
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from evaluate import coco_tokenize  # noqa: E402

FUNCTION_WORDS = {"a", "an", "the", "on", "in", "of", "with", "and", "at", "to", "is", "are", "by", "for", "from",
                  "near", "next", "it", "its", "his", "her", "their", "that", "while", "up", "down", "into",
                  "over", "under", "top", "front"}


def repeats_pair(tokens, content_only=False):
    return any(n >= 2 and not (content_only and set(pair) <= FUNCTION_WORDS)
               for pair, n in Counter(zip(tokens, tokens[1:])).items())


def main(runs: str, names: list[str]):
    print("| run | beam | captions | repeated word pair | ... with a content word | word twice in a row "
          "| punctuation run |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        with open(os.path.join(runs, name, "captions.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        for beam in sorted({r["beam_size"] for r in rows}):
            captions = [r["caption"] for r in rows if r["beam_size"] == beam]
            tokens = [coco_tokenize(c) for c in captions]
            pairs = sum(map(repeats_pair, tokens)) / len(tokens)
            content = sum(repeats_pair(t, content_only=True) for t in tokens) / len(tokens)
            doubled = sum(any(a == b for a, b in zip(t, t[1:])) for t in tokens) / len(tokens)
            punctuation = sum(bool(re.search(r"[^\w\s]{2,}", c)) for c in captions) / len(captions)
            print(f"| {name} | {beam} | {len(tokens)} | {pairs:.1%} | {content:.1%} | {doubled:.1%} "
                  f"| {punctuation:.1%} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
