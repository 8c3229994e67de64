"""The COCO download: what --data-dir lacks of COCO's Karpathy split is fetched with the standard library
alone: Karpathy's split file and the 2014 image archives, which stay zipped (images are read straight from
them). Sizes and SHA-256 as tensorflow/datasets pins them (tensorflow_datasets/url_checksums/
coco_captions.txt). Tests point the entries at a local server.
"""

import hashlib
import http.client
import json
import os
import shutil
import urllib.error
import urllib.request
import zipfile

from tqdm import tqdm

from support.files import atomic_write

COCO_DOWNLOADS = {
    "caption_datasets.zip": {
        "url": "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
        "size": 36_745_453, "sha256": "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817"},
    "train2014.zip": {"url": "http://images.cocodataset.org/zips/train2014.zip", "size": 13_510_573_713,
                      "sha256": "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"},
    "val2014.zip": {"url": "http://images.cocodataset.org/zips/val2014.zip", "size": 6_645_013_297,
                    "sha256": "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"},
}
COCO_IMAGE_FOLDERS = ("train2014", "val2014")  # Karpathy's "filepath"s; X.zip holds X/<filename>
DOWNLOAD_ATTEMPTS = 3  # connections per file and run, each resuming where the last one stopped
BYTES_BAR = {"unit": "B", "unit_scale": True, "unit_divisor": 1024}  # tqdm settings for a progress in bytes


class DownloadError(RuntimeError):
    pass


def prepare_coco(data_dir: str):
    """Download into data_dir what it lacks of COCO's Karpathy split: dataset_coco.json (from
    caption_datasets.zip) if it is missing, and train2014.zip / val2014.zip for those of the two folders that
    dataset_coco.json names and that are there neither as a folder nor zipped. On several processes, call it
    on one and let the others wait."""
    json_path = os.path.join(data_dir, "dataset_coco.json")
    absent = [folder for folder in COCO_IMAGE_FOLDERS if not os.path.isdir(os.path.join(data_dir, folder))
              and not os.path.isfile(os.path.join(data_dir, folder + ".zip"))]
    if os.path.isfile(json_path) and absent:
        absent = [folder for folder in absent if folder in _named_folders(json_path)]
    names = [] if os.path.isfile(json_path) else ["caption_datasets.zip"]
    names += [folder + ".zip" for folder in absent]
    if not names:
        return
    to_fetch = [name for name in names if not os.path.isfile(os.path.join(data_dir, name))]
    missing = sum(COCO_DOWNLOADS[name]["size"] - _part_size(os.path.join(data_dir, name))
                  for name in to_fetch)
    try:
        if to_fetch:
            os.makedirs(data_dir, exist_ok=True)
            free = shutil.disk_usage(data_dir).free
            if free < missing:
                raise DownloadError(f"{data_dir}: {missing / 1e9:.1f} GB to download, "
                                    f"{free / 1e9:.1f} GB free")
            print(f"downloading COCO's Karpathy split into {data_dir} ({missing / 1e9:.1f} GB; --no-download "
                  f"skips this): {', '.join(to_fetch)}")
        for name in to_fetch:
            spec = COCO_DOWNLOADS[name]
            download_file(spec["url"], os.path.join(data_dir, name), spec["size"], spec["sha256"])
        if not os.path.isfile(json_path):
            _extract_member(os.path.join(data_dir, "caption_datasets.zip"), "dataset_coco.json", json_path)
    except DownloadError as e:
        raise DownloadError(f"{e}\n{_manual_steps(data_dir, names)}") from None


def _named_folders(json_path: str) -> set:
    try:
        with open(json_path, encoding="utf-8") as f:
            return {image.get("filepath") for image in json.load(f)["images"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()  # data.read_split will say what is wrong with the file


def _part_size(path: str) -> int:
    return os.path.getsize(path + ".part") if os.path.isfile(path + ".part") else 0


def _manual_steps(data_dir: str, names: list[str]) -> str:
    lines = [f"  {COCO_DOWNLOADS[name]['url']}  ({COCO_DOWNLOADS[name]['size'] / 1e9:.2f} GB)  ->  "
             f"{os.path.join(data_dir, name)}" for name in names]
    return ("To set the data up by hand, download\n" + "\n".join(lines) + "\n"
            "(a file named NAME.part there is resumed by the next run). From caption_datasets.zip only "
            "dataset_coco.json is needed; the image zips can stay zipped or be extracted to train2014/ and "
            "val2014/. Then run again.")


def download_file(url: str, path: str, size: int, sha256: str, attempts: int = DOWNLOAD_ATTEMPTS) -> str:
    """Fetch url into path, with a progress bar. Bytes go to path + ".part", which the next connection (or
    run) continues with an HTTP Range request, or restarts if the server ignores it. The whole file must have
    the published size and SHA-256 before it is renamed to path; a corrupt one is deleted. -> path"""
    if os.path.isfile(path):
        if os.path.getsize(path) != size:
            raise DownloadError(f"{path}: {os.path.getsize(path)} bytes, but the published file has {size}; "
                                f"an incomplete copy? Delete it, or rename it to "
                                f"{os.path.basename(path)}.part to resume")
        return path
    part = path + ".part"
    for attempt in range(attempts):
        have = _part_size(path)
        if have > size:  # longer than the real file: not a prefix of it
            os.remove(part)
            have = 0
        if have == size:
            break
        if attempt:
            print(f"{url}: the connection dropped at {have:,} of {size:,} bytes; resuming")
        try:
            _fetch(url, part, have, size)
        except DownloadError:
            if attempt == 0:
                raise  # no connection at all: say so now (with the manual steps) rather than retry
            break  # a failed reconnection: the file stays resumable from .part
    have = _part_size(path)
    if have != size:
        raise DownloadError(f"{url}: the transfer stopped at {have:,} of {size:,} bytes; run again to resume "
                            f"{part}")
    digest = _sha256(part)
    if digest != sha256:
        os.remove(part)  # its bytes are wrong somewhere: resuming cannot repair it
        raise DownloadError(f"{url}: the downloaded file is corrupt (SHA-256 {digest}, published {sha256}); "
                            f"it was deleted, run again to download it afresh")
    os.replace(part, path)
    return path


def _fetch(url: str, part: str, have: int, size: int):
    """One connection: append to `part` (holding `have` bytes) until the server stops sending."""
    headers = {"User-Agent": "captioner-train", **({"Range": f"bytes={have}-"} if have else {})}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except OSError as e:  # URLError, refused, unreachable, timed out: the network or the server is not there
        raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
    with response:
        if have and response.status != 206:
            print(f"{url}: the server does not resume downloads; starting over")
            have = 0
        elif have and not response.headers.get("Content-Range", "").startswith(f"bytes {have}-"):
            raise DownloadError(f"{url}: asked for the bytes from {have}, the server sent "
                                f"{response.headers.get('Content-Range')!r}")
        length = response.headers.get("Content-Length")
        if length is not None and have + int(length) != size:
            raise DownloadError(f"{url}: the server's file has {have + int(length):,} bytes, the published "
                                f"one {size:,}; has it changed? (see COCO_DOWNLOADS in support/coco_download.py)")
        name = os.path.basename(part)[:-len(".part")]
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=size, initial=have, desc=name, **BYTES_BAR) as bar:
            while True:
                try:
                    chunk = response.read(1 << 20)
                except (OSError, http.client.HTTPException):
                    break  # a dropped connection: what arrived is kept, and the caller resumes from there
                if not chunk:
                    break
                f.write(chunk)  # outside the try: a full disk is an error, not a dropped connection
                bar.update(len(chunk))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), desc=f"checking {os.path.basename(path)}",
                                     leave=False, **BYTES_BAR) as bar:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _extract_member(zip_path: str, name: str, target: str):
    """Copy the member called `name` (in any folder of the archive) to target, atomically."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.namelist() if os.path.basename(m) == name]
            if not members:
                raise DownloadError(f"{zip_path}: no {name} inside")
            with archive.open(members[0]) as source:
                atomic_write(target, lambda f: shutil.copyfileobj(source, f, 1 << 20))
    except (zipfile.BadZipFile, OSError) as e:
        raise DownloadError(f"{zip_path}: cannot extract {name} ({e}); "
                            f"delete the file and run again") from None
