"""gallery.html: self-contained (a moved copy shows every thumbnail in a real browser, Chromium driven by
Playwright, with nothing fetched), no scripts, tabs that work without them, text escaped, and an unreadable
picture shown as a placeholder."""
import json
import os
import re
import shutil
import zipfile
from html.parser import HTMLParser

import pytest

import evaluate
from captioner import build_model, load_backbone, save_model
from data import SplitImage
from support.images import ImageSource

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


def dataset_with_a_zip(root) -> str:
    """tests/conftest.py's tiny dataset with two of the four test pictures moved into DATA/zipped.zip."""
    from conftest import write_dataset
    data = write_dataset(root)
    with open(os.path.join(data, "dataset_coco.json")) as f:
        split = json.load(f)
    moved = [image for image in split["images"] if image["split"] == "test"][:2]
    with zipfile.ZipFile(os.path.join(data, "zipped.zip"), "w") as archive:
        for image in moved:
            archive.write(os.path.join(data, "images", image["filename"]), f"zipped/{image['filename']}")
            os.remove(os.path.join(data, "images", image["filename"]))
            image["filepath"] = "zipped"
    with open(os.path.join(data, "dataset_coco.json"), "w") as f:
        json.dump(split, f)
    return data


def run_evaluate(data, small_decoder_dir, tiny_clip_dir, tmp_path, *extra):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=1)
    checkpoint = tmp_path / "run" / "model"
    save_model(str(checkpoint), model, tokenizer, backbone.preprocessing)
    evaluate.main(evaluate.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data-dir", data, "--split", "test", "--beam-size", "1", "2",
        "--max-length", "6", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--num-workers", "0",
        *extra]))
    return tmp_path / "run"


class Tags(HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.tags = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def assert_self_contained(page: str):
    """No scripts or event handlers, nothing loaded from anywhere but the page itself."""
    tags = Tags(page).tags
    assert not {tag for tag, _ in tags} & {"script", "link", "iframe", "frame", "object", "embed", "base"}
    assert not [attrs for tag, attrs in tags if tag == "meta" and "http-equiv" in attrs]  # no refresh either
    assert not [name for _, attrs in tags for name in attrs if name.startswith("on")]
    assert all(attrs["src"].startswith("data:image/jpeg;base64,") for tag, attrs in tags if "src" in attrs)
    assert all(attrs["href"].startswith("#") for tag, attrs in tags if "href" in attrs)
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)
    assert "@import" not in page and "url(" not in page and "<script" not in page.lower()


@needs_chromium
def test_a_moved_gallery_shows_every_thumbnail_in_a_browser(small_decoder_dir, tiny_clip_dir, tmp_path,
                                                             monkeypatch):
    monkeypatch.setattr(evaluate, "meteor_scorer", lambda: None)  # METEOR is not under test here
    data = dataset_with_a_zip(tmp_path / "data")
    run = run_evaluate(data, small_decoder_dir, tiny_clip_dir, tmp_path, "--gallery", "3")
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run, moved)
    shutil.rmtree(run)
    shutil.rmtree(data)  # the pictures are gone too: the page must carry its own
    page = (moved / "gallery.html").read_text()
    assert_self_contained(page)
    assert page.count("<img ") == 9  # three views of three images

    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:  # the system Chromium: no browser download
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        requested = []
        page.on("request", lambda request: requested.append(request.url))
        page.goto((moved / "gallery.html").as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth, "
                               "i.naturalHeight, i.closest('section').id])")
        cards = page.locator(".card").count()
        missing = page.locator(".missing").count()
        displays = "Array.from(document.querySelectorAll('section')).map(s => getComputedStyle(s).display)"
        shown = page.evaluate(displays)
        page.click("label[for=worst]")  # the tabs need no script
        shown_after_click = page.evaluate(displays)
        browser.close()
    assert len(images) == 9 and cards == 9 and missing == 0
    for complete, width, height, section in images:  # thumbnails from files and from the zip alike
        assert complete and width > 0 and height > 0, section
    assert max(w for _, w, _, _ in images) == 48  # 48 x 40 pictures, never enlarged
    assert shown == ["grid", "none", "none"] and shown_after_click == ["none", "grid", "none"]
    assert [url for url in requested if not url.startswith("data:")] == [(moved / "gallery.html").as_uri()]


def test_gallery_escapes_text_and_survives_unreadable_pictures(tmp_path):
    from PIL import Image
    Image.new("RGB", (600, 300), (200, 30, 30)).save(tmp_path / "red.jpg")
    with zipfile.ZipFile(tmp_path / "pictures.zip", "w") as archive:
        archive.write(tmp_path / "red.jpg", "pictures/red.jpg")
        archive.writestr("pictures/broken.jpg", b"\xff\xd8\xff\xe0 cut short")
    zipped = str(tmp_path / "pictures.zip")
    sources = [ImageSource("red.jpg", str(tmp_path / "red.jpg")),
               ImageSource("gone.jpg", str(tmp_path / "gone.jpg"))]  # deleted after embedding, say
    sources += [ImageSource(f"pictures.zip/pictures/{name}", f"{zipped}/pictures/{name}", zipped,
                            f"pictures/{name}") for name in ("red.jpg", "broken.jpg", "absent.jpg")]
    items = [SplitImage(i, f"<b>{i}.jpg", ["a <script>alert(1)</script> & co", "plain"], source)
             for i, source in enumerate(sources)]
    captions = [["a dog & a cat", "<img src=x onerror=alert(1)>", "", "\"quoted\"", "ok"]]
    per_image = [{"cider_d": [0.5, 2.0, 1.0, 0.0, 0.1], "bleu4": [0.1, 0.2, 0.3, 0.0, 0.05]}]
    results = [{key: 0.25 for _, key, _ in evaluate.COLUMNS} | {"beam_size": 3, "meteor": None}]
    path = tmp_path / "out" / "gallery.html"
    path.parent.mkdir()
    evaluate.write_gallery(str(path), items, results, captions, per_image, 2, "test: 5 images, <model.pt>")
    page = path.read_text()
    assert_self_contained(page)
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;model.pt&gt;" in page
    assert page.count("<img ") == page.count('<img src="data:image/jpeg;base64,')
    best, worst, sample = page.split("<section")[1:]
    assert best.index("&lt;b&gt;1.jpg") < best.index("&lt;b&gt;2.jpg")  # CIDEr-D 2.0, then 1.0
    assert "cannot read the image" in best and "<img " in best  # gone.jpg: a placeholder; the zip's red.jpg
    assert "&lt;b&gt;3.jpg" in worst and "&lt;b&gt;4.jpg" in worst  # broken and absent members: placeholders
    assert worst.count("cannot read the image") == 2 and "<td>n/a</td>" in page  # METEOR absent
    assert len(re.findall(r"<div class=card>", sample)) == 2
    again = tmp_path / "again.html"  # the random view is the same every time
    evaluate.write_gallery(str(again), items, results, captions, per_image, 2, "test: 5 images, <model.pt>")
    assert again.read_text() == page


def test_bidirectional_controls_in_names_are_shown_not_obeyed(tmp_path):
    # U+202E reverses what follows: "photo\u202egpj.exe" would read as "photoexe.jpg"
    sources = [ImageSource(f"x{i}.jpg", str(tmp_path / f"x{i}.jpg")) for i in range(2)]
    items = [SplitImage(0, "photo\u202egpj.exe", ["a \u2066caption\u2069"], sources[0]),
             SplitImage(1, "plain.jpg", ["\u200fref"], sources[1])]
    results = [{key: 0.25 for _, key, _ in evaluate.COLUMNS} | {"beam_size": 1}]
    path = tmp_path / "gallery.html"
    evaluate.write_gallery(str(path), items, results, [["cap\u202a", "ok"]],
                           [{"cider_d": [1.0, 0.5], "bleu4": [0.1, 0.2]}], 2, "header \u202e")
    page = path.read_text()
    assert not re.search("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]", page)
    assert "photo&lt;U+202E&gt;gpj.exe" in page and "&lt;U+2066&gt;caption&lt;U+2069&gt;" in page
