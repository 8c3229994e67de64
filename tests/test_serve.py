"""The page that `captioner.py --serve` serves: used in a real browser as a person would, answering several
browsers at once correctly, and turning every bad request into a 4xx while it keeps serving."""
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid

import pytest
from PIL import Image

from captioner import Captioner, build_model, load_backbone, save_model
from support.images import load_image
from support.serve import MAX_UPLOAD_BYTES, CaptionServer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_MINI = os.path.join(REPO, "..", "shared", "coco-mini", "images")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, small_decoder_dir, tiny_clip_dir):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=2)
    path = str(tmp_path_factory.mktemp("model") / "model")
    save_model(path, model, tokenizer, backbone.preprocessing)
    return path


@pytest.fixture(scope="module")
def server(model_folder):
    """-> (the server's port, the Captioner it uses)."""
    captioner = Captioner.from_pretrained(model_folder)
    httpd = CaptionServer(("127.0.0.1", 0), lambda upload, beam: captioner(load_image(upload), beam, 12))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], captioner
    httpd.shutdown()
    httpd.server_close()


def photos(n: int) -> list[str]:
    if not os.path.isdir(COCO_MINI):
        pytest.skip("needs ../shared/coco-mini")
    return [os.path.join(COCO_MINI, name) for name in sorted(os.listdir(COCO_MINI))[:n]]


def multipart(data: bytes, name: str = "photo.jpg", beam: str | None = "2") -> tuple[str, bytes]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
             f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n"]
    if beam is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="beam"\r\n\r\n{beam}\r\n'.encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


def request(port, method, path, body=b"", headers=None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request(method, path, body=body, headers=headers or {})
    response = connection.getresponse()
    answer = response.status, response.read()
    connection.close()
    return answer


def post_photo(port, data: bytes, name="photo.jpg", beam="2") -> tuple[int, dict]:
    content_type, body = multipart(data, name, beam)
    status, answer = request(port, "POST", "/caption", body, {"Content-Type": content_type})
    return status, json.loads(answer)


def test_a_photo_is_captioned_as_the_api_captions_it(server):
    port, captioner = server
    path = photos(1)[0]
    status, answer = post_photo(port, open(path, "rb").read())
    assert status == 200 and answer["caption"] == captioner(path, 2, 12) and answer["seconds"] > 0


def test_eight_requests_at_once_each_get_their_own_caption(server):
    port, captioner = server
    paths = photos(8)
    expected = [captioner(path, 2, 12) for path in paths]
    answers = [None] * 8

    def send(k):
        answers[k] = post_photo(port, open(paths[k], "rb").read())
    threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in answers] == [200] * 8
    assert [answer["caption"] for _, answer in answers] == expected


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (8000, 6000)).save(buffer, "PNG")  # 48 megapixels of nothing: a small file
    return buffer.getvalue()


def test_bad_photos_get_an_error_each_and_the_server_keeps_serving(server):
    port, _ = server
    jpeg = open(photos(1)[0], "rb").read()
    for data, message in [(b"just some text\n", "cannot identify image file"),
                          (jpeg[:len(jpeg) // 3], "cannot read this image"),
                          (bomb(), "more than the 40,000,000 this program decodes")]:
        status, answer = post_photo(port, data)
        assert status == 422 and message in answer["error"]
    assert post_photo(port, jpeg)[0] == 200


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server):
    port, _ = server
    content_type, body = multipart(b"x")
    cases = [
        ("POST", "/caption", b"x" * 100, {"Content-Type": content_type,
                                          "Content-Length": str(MAX_UPLOAD_BYTES + 1)}, 413),
        ("PUT", "/", b"", {}, 405), ("DELETE", "/caption", b"", {}, 405),
        ("GET", "/../../etc/passwd", b"", {}, 404), ("GET", "/support/serve.py", b"", {}, 404),
        ("GET", "/%2e%2e/%2e%2e/etc/passwd", b"", {}, 404), ("POST", "/other", body, {}, 404),
        ("POST", "/caption", b"--nonsense\r\n\r\n", {"Content-Type": "multipart/form-data; boundary=x"}, 400),
        ("POST", "/caption", b"image=1", {"Content-Type": "application/x-www-form-urlencoded"}, 400),
        ("POST", "/caption", body, {"Content-Type": content_type.replace("form-data", "mixed")}, 400),
    ]
    for method, path, data, headers, expected in cases:
        status, _ = request(port, method, path, data, headers)
        assert status == expected, (method, path)
    boundary = "b0"
    odd_beam = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\nx\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="beam"\r\nContent-Type: message/rfc822'
                f'\r\n\r\nSubject: 1\r\n\r\n2\r\n--{boundary}--\r\n').encode()
    many_parts = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="p{k}"\r\n\r\n1\r\n'.encode()
                          for k in range(20)) + f"--{boundary}--\r\n".encode()
    for data in (odd_beam, many_parts):
        status, _ = request(port, "POST", "/caption", data,
                            {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        assert status == 400
    assert request(port, "POST", "/caption", b"", {"Content-Type": content_type, "Content-Length": "0"})[0] == 400
    jpeg = open(photos(1)[0], "rb").read()
    assert post_photo(port, jpeg, beam="99")[0] == 400
    assert post_photo(port, jpeg, beam=None)[0] == 200  # beam 1 by default
    status, page = request(port, "GET", "/")
    assert status == 200 and b"<title>Captioner</title>" in page


def test_the_page_fetches_nothing_from_elsewhere():
    page = open(os.path.join(REPO, "support", "page.html")).read()
    assert "http://" not in page and "https://" not in page and "src=" not in page.replace("image.src", "")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
def test_a_person_uploads_photos_in_a_browser_and_reads_the_captions(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    port, captioner = server
    paths = photos(2)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a picture")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 390, "height": 844})  # a phone's screen
        outside = []
        page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(
            (f"http://127.0.0.1:{port}/", "blob:", "data:")) else None)
        page.goto(f"http://127.0.0.1:{port}/")
        page.select_option("#beam", "5")
        page.set_input_files("input[type=file]", [*paths, str(notes)])
        # polled from here: the page's Content-Security-Policy (no eval) holds for Playwright's scripts too
        for _ in range(600):
            texts = page.locator(".caption").all_inner_texts()
            if len(texts) == 3 and not any(text.endswith("\u2026") for text in texts):
                break
            page.wait_for_timeout(100)
        cards = {card.locator(".meta").inner_text().split(" \u00b7 ")[0]: card.locator(".caption").inner_text()
                 for card in page.locator(".card").all()}
        if os.environ.get("SCREENSHOT"):  # docs/page.png: SCREENSHOT=docs/page.png pytest -k browser
            page.screenshot(path=os.environ["SCREENSHOT"], full_page=True)
        browser.close()
    assert sorted(cards) == sorted([os.path.basename(p) for p in paths] + ["notes.txt"])
    assert all(cards[os.path.basename(p)] == captioner(p, 5, 12) for p in paths)  # the API's captions
    assert cards["notes.txt"] == "error: cannot read this image (cannot identify image file 'notes.txt')"
    assert not outside


def test_serving_beyond_this_machine_warns(model_folder):
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "captioner.py"), "--checkpoint", model_folder,
                                "--serve", "--host", "0.0.0.0", "--port", "0", "--device", "cpu"],
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        lines = [process.stderr.readline(), process.stderr.readline()]
        while not lines[-1].startswith("serving on"):
            lines.append(process.stderr.readline())
            assert process.poll() is None and len(lines) < 50, lines
        assert any(line.startswith("warning: serving on 0.0.0.0, which other machines can reach")
                   for line in lines)
        port = int(lines[-1].split(":")[2].split("/")[0])
        assert request(port, "GET", "/")[0] == 200
    finally:
        process.terminate()
        process.wait(timeout=30)
