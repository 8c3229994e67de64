"""The COCO download (offline: a local HTTP server) and images read straight from zip archives."""
import hashlib
import http.server
import json
import os
import re
import shutil
import socket
import threading
import zipfile

import numpy as np
import pytest

import support.coco_download as coco
from data import cached_image_tokens, read_split
from support.embedding_cache import TokenCache
import train
from conftest import write_dataset


@pytest.fixture
def serve():
    """serve(files, ignore_range=False, cut_first_at=None) -> (base URL, requests seen as (path, Range
    header)). Answers Range requests with 206 unless told to ignore them; can break the first transfer off
    part way."""
    servers = []

    def start(files, ignore_range=False, cut_first_at=None):
        requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append((self.path, self.headers.get("Range")))
                body = files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                start = int(match[1]) if match and not ignore_range else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                payload = body[start:]
                if cut_first_at is not None and len(requests) == 1:
                    payload = payload[:cut_first_at]  # then the connection closes: a dropped transfer
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", requests

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def closed_port_url(name):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"  # nothing listens there: connection refused


BODY = np.random.default_rng(0).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
SHA = hashlib.sha256(BODY).hexdigest()


def test_a_dropped_transfer_is_resumed_with_a_range_request(serve, tmp_path):
    base, requests = serve({"/f.zip": BODY}, cut_first_at=70_000)
    path = str(tmp_path / "f.zip")
    assert coco.download_file(f"{base}/f.zip", path, len(BODY), SHA) == path
    assert requests == [("/f.zip", None), ("/f.zip", "bytes=70000-")]
    assert open(path, "rb").read() == BODY and os.listdir(tmp_path) == ["f.zip"]


def test_a_partial_file_from_an_earlier_run_is_continued(serve, tmp_path):
    base, requests = serve({"/f.zip": BODY})
    (tmp_path / "f.zip.part").write_bytes(BODY[:1234])
    coco.download_file(f"{base}/f.zip", str(tmp_path / "f.zip"), len(BODY), SHA)
    assert requests == [("/f.zip", "bytes=1234-")]
    assert (tmp_path / "f.zip").read_bytes() == BODY and not (tmp_path / "f.zip.part").exists()


def test_a_server_that_ignores_range_gets_a_fresh_start(serve, tmp_path, capsys):
    base, requests = serve({"/f.zip": BODY}, ignore_range=True)
    (tmp_path / "f.zip.part").write_bytes(b"x" * 1234)  # not even a prefix: appending would corrupt the file
    coco.download_file(f"{base}/f.zip", str(tmp_path / "f.zip"), len(BODY), SHA)
    assert requests == [("/f.zip", "bytes=1234-")]
    assert (tmp_path / "f.zip").read_bytes() == BODY
    assert "the server does not resume downloads; starting over" in capsys.readouterr().out


def test_a_corrupt_download_is_rejected_and_not_left_in_place(serve, tmp_path):
    corrupt = bytearray(BODY)
    corrupt[100_000] ^= 1
    base, _ = serve({"/f.zip": bytes(corrupt)})
    with pytest.raises(coco.DownloadError, match=rf"{base}/f.zip: the downloaded file is corrupt \(SHA-256 "
                                                  rf"[0-9a-f]{{64}}, published {SHA}\); it was deleted"):
        coco.download_file(f"{base}/f.zip", str(tmp_path / "f.zip"), len(BODY), SHA)
    assert os.listdir(tmp_path) == []


def test_a_file_of_another_size_is_refused_before_it_is_fetched(serve, tmp_path):
    base, _ = serve({"/f.zip": BODY + b"more"})
    with pytest.raises(coco.DownloadError,
                       match="the server's file has 200,004 bytes, the published one 200,000"):
        coco.download_file(f"{base}/f.zip", str(tmp_path / "f.zip"), len(BODY), SHA)
    (tmp_path / "g.zip").write_bytes(BODY[:10])  # an incomplete copy put in place by hand
    with pytest.raises(coco.DownloadError, match="g.zip: 10 bytes, but the published file has 200000"):
        coco.download_file(f"{base}/g.zip", str(tmp_path / "g.zip"), len(BODY), SHA)


def test_without_network_the_error_gives_the_urls_and_the_manual_steps(tmp_path, monkeypatch):
    for name in coco.COCO_DOWNLOADS:
        monkeypatch.setitem(coco.COCO_DOWNLOADS, name,
                            {**coco.COCO_DOWNLOADS[name], "url": closed_port_url(name)})
    data = tmp_path / "coco"
    with pytest.raises(coco.DownloadError) as error:
        coco.prepare_coco(str(data))
    message = str(error.value)
    assert "caption_datasets.zip: cannot connect" in message
    assert "To set the data up by hand, download" in message
    for name, spec in coco.COCO_DOWNLOADS.items():
        assert f"{spec['url']}  ({spec['size'] / 1e9:.2f} GB)  ->  {data / name}" in message
    assert "only dataset_coco.json is needed" in message and "extracted to train2014/ and val2014/" in message


def karpathy_coco(root):
    """A tiny dataset laid out as COCO's: train images in train2014/, val and test images in val2014/ ->
    {file name in the download: bytes} for caption_datasets.zip, train2014.zip and val2014.zip."""
    write_dataset(root)
    with open(os.path.join(root, "dataset_coco.json")) as f:
        dataset = json.load(f)
    archives = {}
    for folder in ("train2014", "val2014"):
        os.makedirs(os.path.join(root, folder))
        with zipfile.ZipFile(os.path.join(root, folder + ".zip"), "w") as archive:
            for image in dataset["images"]:
                if (image["split"] == "train") == (folder == "train2014"):
                    source = os.path.join(root, "images", image["filename"])
                    archive.write(source, f"{folder}/{image['filename']}")
                    shutil.copy(source, os.path.join(root, folder, image["filename"]))
                    image["filepath"] = folder
        archives[folder + ".zip"] = open(os.path.join(root, folder + ".zip"), "rb").read()
    with open(os.path.join(root, "dataset_coco.json"), "w") as f:
        json.dump(dataset, f)
    with zipfile.ZipFile(os.path.join(root, "caption_datasets.zip"), "w", zipfile.ZIP_DEFLATED) as archive:
        archive.write(os.path.join(root, "dataset_coco.json"), "dataset_coco.json")
        archive.writestr("dataset_flickr8k.json", "{}")
    archives["caption_datasets.zip"] = open(os.path.join(root, "caption_datasets.zip"), "rb").read()
    return archives


def test_prepare_coco_downloads_what_is_missing_and_nothing_more(serve, tmp_path, monkeypatch):
    archives = karpathy_coco(str(tmp_path / "source"))
    base, requests = serve({f"/{name}": data for name, data in archives.items()})
    for name, data in archives.items():
        monkeypatch.setitem(coco.COCO_DOWNLOADS, name, {"url": f"{base}/{name}", "size": len(data),
                                                         "sha256": hashlib.sha256(data).hexdigest()})
    data = tmp_path / "coco"
    coco.prepare_coco(str(data))
    assert sorted(os.listdir(data)) == ["caption_datasets.zip", "dataset_coco.json", "train2014.zip",
                                        "val2014.zip"]
    source = tmp_path / "source" / "dataset_coco.json"
    assert (data / "dataset_coco.json").read_bytes() == source.read_bytes()
    assert sorted(path for path, _ in requests) == ["/caption_datasets.zip", "/train2014.zip", "/val2014.zip"]
    coco.prepare_coco(str(data))  # everything there: no request
    (data / "train2014.zip").unlink()
    (data / "train2014").mkdir()  # an extracted folder does as well as the zip
    (data / "val2014.zip").rename(data / "val2014.zip.part")  # as if cut short... at its full size
    coco.prepare_coco(str(data))
    assert len(requests) == 3 and (data / "val2014.zip").read_bytes() == archives["val2014.zip"]


def test_a_dataset_with_its_own_images_downloads_nothing(tiny_dataset, tmp_path, monkeypatch):
    for name in coco.COCO_DOWNLOADS:  # any download attempt would fail loudly
        monkeypatch.setitem(coco.COCO_DOWNLOADS, name,
                            {**coco.COCO_DOWNLOADS[name], "url": closed_port_url(name)})
    coco.prepare_coco(tiny_dataset)  # dataset_coco.json names only images/
    assert train.get_args_parser().parse_args([]).download
    assert not train.get_args_parser().parse_args(["--no-download"]).download


def test_images_read_from_zips_give_the_tokens_of_the_same_images_in_folders(tiny_clip_dir, tmp_path):
    karpathy_coco(str(tmp_path / "folders"))
    zipped = tmp_path / "zips"
    zipped.mkdir()
    for name in ("dataset_coco.json", "train2014.zip", "val2014.zip"):
        shutil.copy(tmp_path / "folders" / name, zipped / name)
    for name in ("train2014.zip", "val2014.zip"):
        (tmp_path / "folders" / name).unlink()
    name = f"clip:{tiny_clip_dir}"
    for split in ("train", "val"):
        from_folders = read_split(str(tmp_path / "folders"), split)
        from_zips = read_split(str(zipped), split)
        folder = "train2014" if split == "train" else "val2014"
        assert [item.path for item in from_zips] == \
            [str(zipped / f"{folder}.zip" / folder / item.filename) for item in from_folders]
        with zipfile.ZipFile(zipped / f"{folder}.zip") as archive:
            info = archive.getinfo(from_zips[0].source.member)
        assert (from_zips[0].source.zip_size, from_zips[0].source.zip_crc) == (info.file_size, info.CRC)
        expected, _ = cached_image_tokens(from_folders, split, name, 2, str(tmp_path / "cache"),
                                               num_workers=0)
        for workers in (0, 2):  # each worker opens its own ZipFile
            tokens, meta = cached_image_tokens(from_zips, split, name, 2,
                                                     str(tmp_path / f"cache{workers}"), batch_size=3,
                                                     num_workers=workers)
            assert meta["unreadable"] == []
            np.testing.assert_array_equal(np.array(tokens), np.array(expected))


def test_a_changed_zip_member_changes_the_cache_key_and_a_missing_one_is_unreadable(tiny_clip_dir, tmp_path):
    root = str(tmp_path / "data")
    karpathy_coco(root)
    shutil.rmtree(os.path.join(root, "val2014"))
    items = read_split(root, "val")
    key = TokenCache.of(items, "val", "x", 2, str(tmp_path)).key
    with zipfile.ZipFile(os.path.join(root, "val2014.zip")) as archive:
        members = {m: archive.read(m) for m in archive.namelist()}
    names = sorted(members)  # 4 val images, then 4 test images
    with zipfile.ZipFile(os.path.join(root, "val2014.zip"), "w") as archive:  # one picture replaced, one gone
        for i, member in enumerate(names):
            if i != 1:
                archive.writestr(member, members[names[-1]] if i == 0 else members[member])
    changed = read_split(root, "val")
    assert TokenCache.of(changed, "val", "x", 2, str(tmp_path)).key != key
    assert changed[1].source.zip_size == -1
    _, meta = cached_image_tokens(changed, "val", f"clip:{tiny_clip_dir}", 2, str(tmp_path),
                                       num_workers=0)
    assert meta["unreadable"] == [1]
    assert meta["unreadable_images"][0]["error"].startswith("FileNotFoundError: no val2014/")


def test_images_neither_in_a_folder_nor_zipped_are_named(tmp_path):
    root = str(tmp_path / "data")
    karpathy_coco(root)
    shutil.rmtree(os.path.join(root, "train2014"))
    os.remove(os.path.join(root, "train2014.zip"))
    with pytest.raises(FileNotFoundError,
                       match=r"data/train2014: no such folder, and no train2014.zip beside it"):
        read_split(root, "train")
    with open(os.path.join(root, "train2014.zip"), "wb") as f:
        f.write(b"PK not really")
    with pytest.raises(ValueError,
                       match=r"train2014.zip: not a readable zip archive .* Delete it and run again"):
        read_split(root, "train")
