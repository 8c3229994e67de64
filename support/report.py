"""What evaluate.py shows: the metric table as text, and gallery.html, one self-contained page of captioned
images (thumbnails inline, no scripts, nothing fetched), every string from the data escaped.
"""

import base64
import html
import io
import random
import re

from support.files import atomic_write_text
from support.images import IMAGE_ERRORS, Archives, load_image

COLUMNS = [("beam size", "beam_size", "{}"), ("BLEU-1", "bleu1", "{:.3f}"), ("BLEU-2", "bleu2", "{:.3f}"),
           ("BLEU-3", "bleu3", "{:.3f}"), ("BLEU-4", "bleu4", "{:.3f}"), ("METEOR", "meteor", "{:.3f}"),
           ("ROUGE-L", "rouge_l", "{:.3f}"), ("CIDEr-D", "cider_d", "{:.3f}"),
           ("BLEU-4 (sacrebleu)", "bleu4_sacrebleu", "{:.3f}"),
           ("BLEU-4 (original's protocol)", "bleu4_original", "{:.3f}"), ("seconds", "seconds", "{:.1f}")]


def table_rows(results: list[dict]) -> list[list[str]]:
    """The metric table as text cells, the header first; an absent figure (METEOR without java) is n/a."""
    return [[name for name, _, _ in COLUMNS]] + [
        ["n/a" if r[key] is None else form.format(r[key]) for _, key, form in COLUMNS] for r in results]


def thumbnail(source, archives: Archives, size: int = 256) -> str | None:
    """A JPEG data: URI of the image (a file or a zip member), longest side `size` px; None if unreadable."""
    try:
        image = load_image(archives.read(source))
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=80)
    except IMAGE_ERRORS:  # a page of the others is still worth having
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


# Bidirectional controls (U+202E, the right-to-left override, among them) reorder the text after them: in a
# file name they can make "gpj.exe" look like "exe.jpg". Shown as their code point instead, they do nothing.
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def displayed(text: str) -> str:
    """Text safe to put in the page: bidirectional controls made visible as <U+XXXX>, then HTML-escaped."""
    return html.escape(BIDI_CONTROLS.sub(lambda m: f"<U+{ord(m.group(0)):04X}>", str(text)))


def write_gallery(path: str, items, results: list[dict], captions: list[list[str]], per_image: list[dict],
                  count: int, header: str):
    """gallery.html: `count` images per view (best, worst and a random sample, by the CIDEr-D of the beam size
    with the best corpus CIDEr-D), each with its thumbnail, its caption and scores at every beam size and its
    references. One self-contained file: thumbnails inline, no scripts, nothing fetched."""
    e = displayed
    rank = max(range(len(results)), key=lambda b: results[b]["cider_d"])
    cider = per_image[rank]["cider_d"]
    views = {"best": sorted(range(len(items)), key=lambda i: (-cider[i], i))[:count],
             "worst": sorted(range(len(items)), key=lambda i: (cider[i], i))[:count],
             "random": random.Random(0).sample(range(len(items)), min(count, len(items)))}
    archives, thumbnails = Archives(), {}
    for i in dict.fromkeys(i for shown in views.values() for i in shown):
        thumbnails[i] = thumbnail(items[i].source, archives)
    archives.close()
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
