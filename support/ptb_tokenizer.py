"""PTB tokens as the COCO caption evaluation sees them, without Java.

pycocoevalcap lowercases captions and runs Stanford's PTBTokenizer (a Java program) over them, then drops
punctuation tokens. coco_tokenize is a Python reading of that tokenizer for caption text: the regular
expressions below imitate the lexer's rules one by one. tests/test_metrics.py checks it against the Java
tokenizer on every coco-mini caption.
"""

import re

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
