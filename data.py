"""
The data plumbing under train.py and evaluate.py: COCO's Karpathy split on disk, and the frozen backbone's
image tokens for a split, computed once and cached.

    items = read_karpathy("data/coco", "val")             # [SplitImage(cocoid, filename, captions, source)]
    items, tokens, meta = split_image_tokens(items, "val", "blip:base", grid=3, cache_dir=default_cache_dir())
    tokens[i]                                             # (K, D) float16, the image tokens of items[i]

In reading order: the COCO download (what --data-dir lacks, with resumable and verified transfers), the
Karpathy split file, reading an image from a folder or a zip archive, and the embedding cache.
"""

import contextlib
import functools
import glob
import hashlib
import http.client
import io
import json
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from captioner import (atomic_write, atomic_write_text, autocast, embedding_precision, file_lock,
                       load_backbone, preprocess_image, remove_orphans)

# ---------------------------------------------------------------------------------------------------------
# ---- COCO download ----
# What --data-dir lacks of COCO's Karpathy split is fetched with the standard library alone: Karpathy's split
# file and the 2014 image archives, which stay zipped (images are read straight from them). Sizes and
# SHA-256 as tensorflow/datasets pins them (tensorflow_datasets/url_checksums/coco_captions.txt). Tests point
# the entries at a local server.

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
        return set()  # read_karpathy will say what is wrong with the file


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
                                f"one {size:,}; has it changed? (see COCO_DOWNLOADS in data.py)")
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


# ---------------------------------------------------------------------------------------------------------
# ---- the Karpathy split ----

@dataclass(frozen=True)
class ImageSource:
    """Where an image's bytes are: a file in a folder, or a member of DATA_DIR/<folder>.zip."""
    name: str  # relative to the data folder ("images/x.jpg", "val2014.zip/val2014/x.jpg"): moves with it
    path: str  # what people are shown: the file, or the zip's path joined with the member
    zip_path: str | None = None
    member: str | None = None
    zip_size: int = -1  # the member's size and CRC from the zip's directory; -1 when it is not in the zip
    zip_crc: int = -1

    def fingerprint(self) -> list:
        """What the cache key needs to know about this file's content, without reading it."""
        if self.zip_path:
            return [self.zip_size, self.zip_crc]
        try:
            return [os.path.getsize(self.path)]
        except OSError:
            return [-1]  # missing: embedding will list it as unreadable


@dataclass(frozen=True)
class SplitImage:
    cocoid: int
    filename: str
    captions: list = field(hash=False)  # raw caption strings
    source: ImageSource

    @property
    def path(self) -> str:
        return self.source.path


def read_karpathy(data_dir: str, split: str) -> list[SplitImage]:
    """Images of one split of a Karpathy-format `dataset_coco.json`. `train` also takes `restval` (the 30k
    val2014 images Karpathy added to training). An image is the file DATA_DIR/filepath/filename or, when only
    DATA_DIR/filepath.zip is there, its member filepath/filename."""
    path = os.path.join(data_dir, "dataset_coco.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; --data-dir must hold a Karpathy-format "
                                f"dataset_coco.json and the images it names")
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f)["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Karpathy-format split file ({type(e).__name__}: {e})") from None
    wanted = ("train", "restval") if split == "train" else (split,)
    items, archives, uncaptioned, empty, seen, duplicates = [], {}, [], 0, set(), []
    for i, image in enumerate(images):
        try:
            if image["split"] not in wanted:
                continue
            folder, filename = image.get("filepath", ""), image["filename"]
            if not _inside(data_dir, folder, filename):
                raise ValueError(f"{path}: images[{i}] names {os.path.join(folder, filename)!r}, which is "
                                 f"not inside {data_dir}; refusing to read it")
            captions = [s["raw"].strip() for s in image["sentences"]]
            empty += captions.count("")
            captions = [caption for caption in captions if caption]
            if not captions:  # nothing to learn from or to score against
                uncaptioned.append(image.get("cocoid", i))
                continue
            source = _image_source(data_dir, folder, filename, archives)
            duplicates += [source.name] if source.name in seen else []
            seen.add(source.name)
            items.append(SplitImage(image.get("cocoid", image.get("imgid", i)), filename, captions, source))
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: images[{i}] is malformed (missing or wrong {e})") from None
    if uncaptioned:
        print(f"warning: {path}: {len(uncaptioned)} {split} images have no caption and are left out "
              f"(cocoids {uncaptioned[:5]}{' ...' if len(uncaptioned) > 5 else ''})")
    if empty:
        print(f"warning: {path}: {empty} empty {split} captions are left out")
    if duplicates:
        print(f"warning: {path}: {len(duplicates)} {split} entries name an image already listed "
              f"(first: {duplicates[0]})")
    if not items:
        present = sorted({image.get("split") for image in images if isinstance(image, dict)})
        raise ValueError(f"{path}: split {split!r} has no images with captions (splits present: {present})")
    return items


def _inside(data_dir: str, folder: str, filename: str) -> bool:
    """Whether folder/filename (from the split file, so untrusted) stays inside data_dir: relative, without
    '..' or a NUL. Symbolic links are the data folder owner's own choice (train2014 -> /datasets/...): the
    split file cannot make one, so they are followed."""
    if not isinstance(folder, str) or not isinstance(filename, str) or not filename:
        raise TypeError("filepath/filename")
    relative = os.path.join(folder, filename)
    return not (os.path.isabs(relative) or "\0" in relative
                or ".." in relative.replace("\\", "/").split("/"))


def _image_source(data_dir: str, folder: str, filename: str, archives: dict) -> ImageSource:
    """`archives` caches each folder's zip directory:
    {folder: None (a folder) or (zip path, {member: (size, crc)})}."""
    directory = os.path.join(data_dir, folder)
    if folder not in archives:
        archives[folder] = None
        if not os.path.isdir(directory) and not os.path.isfile(directory + ".zip"):
            raise FileNotFoundError(f"{directory}: no such folder, and no {os.path.basename(directory)}.zip "
                                    f"beside it; {os.path.join(data_dir, 'dataset_coco.json')} names "
                                    f"images there")
        if not os.path.isdir(directory):
            try:
                with zipfile.ZipFile(directory + ".zip") as archive:
                    members = {info.filename: (info.file_size, info.CRC) for info in archive.infolist()}
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{directory}.zip: not a readable zip archive ({e}); an incomplete "
                                 f"download? Delete it and run again") from None
            archives[folder] = (directory + ".zip", members)
    if archives[folder] is None:
        return ImageSource(os.path.join(folder, filename), os.path.join(directory, filename))
    zip_path, members = archives[folder]
    member = f"{folder}/{filename}"
    size, crc = members.get(member, (-1, -1))
    return ImageSource(os.path.join(folder + ".zip", member), os.path.join(zip_path, member), zip_path,
                       member, size, crc)


def tokenize_captions(tokenizer, items, max_tokens: int) -> list[list[list[int]]]:
    """-> per image, per caption: token ids ending with EOS, at most max_tokens long (EOS included)."""
    texts = [caption for item in items for caption in item.captions]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return [[next(encoded)[: max_tokens - 1] + [eos] for _ in item.captions] for item in items]


# ---------------------------------------------------------------------------------------------------------
# ---- reading images ----

# What reading one damaged, missing or hostile picture can raise. Anything else is a bug, and stops the run
# rather than being recorded in the cache as an unreadable image.
IMAGE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error,
                Image.DecompressionBombError)


class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, pixels (3, S, S), error): its image decoded and preprocessed for a backbone (in
    DataLoader workers). An image that cannot be read gives zero pixels and the error's text, so that one bad
    file among 100,000 is recorded instead of stopping the run."""

    def __init__(self, items: list[SplitImage], preprocessing: dict):
        self.sources = [item.source for item in items]
        self.preprocessing = preprocessing
        self._archives, self._pid = {}, None

    def __len__(self):
        return len(self.sources)

    def __getstate__(self):  # open archives stay behind when the dataset is sent to spawned workers
        return {**self.__dict__, "_archives": {}, "_pid": None}

    def _archive(self, zip_path):
        # Each process opens its own handle, on first use: a ZipFile reads through one file position, so a
        # handle inherited across fork and used by several workers at once would hand them each other's bytes.
        if self._pid != os.getpid():
            self._archives, self._pid = {}, os.getpid()
        if zip_path not in self._archives:
            self._archives[zip_path] = zipfile.ZipFile(zip_path)
        return self._archives[zip_path]

    def __getitem__(self, i):
        source = self.sources[i]
        try:
            image = source.path
            if source.zip_path:
                try:
                    image = io.BytesIO(self._archive(source.zip_path).read(source.member))
                except KeyError:
                    raise FileNotFoundError(f"no {source.member} in {source.zip_path}") from None
            return i, preprocess_image(image, self.preprocessing), ""
        except IMAGE_ERRORS as e:
            size = self.preprocessing["size"]
            return i, torch.zeros(3, size, size), f"{type(e).__name__}: {e}"


def _one_thread(_worker_id):
    # Workers only decode and resize JPEGs; left at the default they would each start as many math threads
    # as there are cores and fight the backbone for them.
    torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------
# ---- embedding cache ----
# The frozen backbone's image tokens for a split, (N, K, D) float16, computed once and memory-mapped. The
# file names carry a hash of everything that determines the content (backbone, grid, precision, and each
# image's name inside the data folder and size), so a cache made for anything else is never picked up, while
# a data folder that is moved or copied keeps its cache. One split's files, all named STEM.*, live like this:
#
#   prepare (rank 0)   STEM.partial.npy (N, K, D) zeros, STEM.partial-done.npy (N,) all TODO,
#                      then STEM.partial.json, which makes the two count (a stopped build resumes from them)
#   embed (each rank   rows of its share -> STEM.partial.npy; flushed, then marked EMBEDDED or UNREADABLE in
#    its share)        STEM.partial-done.npy; why a row is unreadable -> STEM.partial-unreadable-<rank>.jsonl
#   publish (rank 0)   STEM.unreadable.json and STEM.json, then STEM.partial.npy renamed to STEM.npy;
#                      the other partial files removed
#   use                STEM.npy memory-mapped read-only, if STEM.json describes it (else it is rebuilt)

CACHE_VERSION = 3
TODO, EMBEDDED, UNREADABLE = 0, 1, 2  # the done mask's codes, one per row


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "captioner", "embeddings")


def _backbone_fingerprint(backbone_name: str):
    """A local backbone directory can change under the same name: fold its files' sizes and times in."""
    folder = backbone_name[len("clip:"):] if backbone_name.startswith("clip:") else ""
    if not os.path.isdir(folder):
        return backbone_name
    files = sorted((f, os.path.getsize(os.path.join(folder, f)), os.path.getmtime(os.path.join(folder, f)))
                   for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    return [os.path.abspath(folder), files]


@dataclass(frozen=True)
class TokenCache:
    """One split's cache: where its files are (STEM.*, see above) and what they must hold."""
    stem: str
    key: str
    split: str
    backbone: str
    grid: int
    precision: str
    images: int  # N

    @classmethod
    def of(cls, items, split, backbone_name, grid, cache_dir, precision="32") -> "TokenCache":
        identity = {"version": CACHE_VERSION, "backbone": _backbone_fingerprint(backbone_name), "grid": grid,
                    "precision": precision,
                    "images": [[item.cocoid, item.source.name, *item.source.fingerprint()] for item in items]}
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone_name.split("/")[-1])
        stem = os.path.join(cache_dir, f"{split}-{slug}-grid{grid}-{key}")
        return cls(stem, key, split, backbone_name, grid, precision, len(items))

    def path(self, suffix: str) -> str:
        return self.stem + suffix


def split_image_tokens(items, split, backbone_name, grid, cache_dir, device="cpu", precision="32",
                       num_workers=2, batch_size=32, get_backbone=None, rank=0, world_size=1, barrier=None):
    """The entry point: -> (items, tokens, meta) for the images of a split that could be read. tokens[i]
    (K, D) float16 belongs to items[i]; the images that could not be read are left out, with a warning that
    names the list of them (meta["unreadable_file"]). See cached_image_tokens for the arguments."""
    tokens, meta = cached_image_tokens(items, split, backbone_name, grid, cache_dir, device, batch_size,
                                       num_workers, get_backbone, precision, rank, world_size, barrier)
    bad = meta["unreadable_images"]
    if bad and rank == 0:
        print(f"warning: {len(bad)} of {len(items)} {split} images could not be read and are left out. The "
              f"list: {meta['unreadable_file']}. If the cause has gone (a missing file now restored), delete "
              f"{meta['unreadable_file'][:-len('.unreadable.json')]}.* to embed the split again")
    return (*drop_unreadable(items, tokens, meta), meta)


def training_splits(data_dir, backbone_name, grid, cache_dir, precision, num_workers, processes,
                    download=False) -> dict:
    """-> {"train": ..., "val": ...}: each split's readable images ("items"), their cached image tokens
    ("tokens") and the backbone's "preprocessing", for train.py and scst.py. processes: train.Processes (its
    rank, world_size, device, is_main and barrier); with download, its rank 0 fetches COCO first."""
    if download and processes.is_main:  # one process downloads; torchrun stops the others if it fails
        prepare_coco(data_dir)
    processes.barrier()
    get_backbone = functools.cache(lambda: load_backbone(backbone_name))  # once, for both splits
    splits = {}
    for split in ("train", "val"):
        items, tokens, meta = split_image_tokens(
            read_karpathy(data_dir, split), split, backbone_name, grid, cache_dir, processes.device,
            precision, num_workers, get_backbone=get_backbone, rank=processes.rank,
            world_size=processes.world_size, barrier=processes.barrier)
        splits[split] = {"items": items, "tokens": tokens, "preprocessing": meta["preprocessing"]}
    shared = {item.source.name for item in splits["train"]["items"]} & \
        {item.source.name for item in splits["val"]["items"]}
    if shared and processes.is_main:  # validation would then flatter the model
        print(f"warning: {len(shared)} images are in both the train and the val split (e.g. {min(shared)})")
    return splits


def cached_image_tokens(items, split, backbone_name, grid, cache_dir, device="cpu", batch_size=32,
                        num_workers=2, get_backbone=None, precision="32", rank=0, world_size=1, barrier=None):
    """-> (tokens, meta): a read-only memmap (N, K, D) float16 of the split's image tokens, in item order,
    and its description. meta["unreadable"] lists the rows whose image could not be read (zeros; why: in
    meta["unreadable_images"] and the file meta["unreadable_file"]).

    Built on first use, or resumed where an earlier build stopped. Only then is the backbone loaded
    (`get_backbone()`, default: by name); it runs in `precision` ("32", "16" or "bf16": autocast on CUDA,
    fp32 elsewhere). Processes on one machine share the work when each calls this with its `rank` <
    `world_size` and a `barrier` that waits for all of them: rank 0 loads the backbone first (a download
    happens once), prepares the files, each rank embeds its share, rank 0 checks and publishes the cache,
    then all open it."""
    barrier = barrier or (lambda: None)
    precision = embedding_precision(device, precision)
    cache = TokenCache.of(items, split, backbone_name, grid, cache_dir, precision)
    lock_path = cache.path(".lock")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666))  # a read-only folder fails here
    except OSError as e:
        raise OSError(f"{cache_dir}: cannot write the embedding cache here ({e.strerror}); choose another "
                      f"--cache-dir") from None
    lock = file_lock(lock_path, f"the {split} embedding cache") if rank == 0 else contextlib.nullcontext()
    with lock:  # a second run on the same cache waits, then reuses what the first one built
        tokens, meta = _load_or_build(cache, items, device, batch_size, num_workers, get_backbone, rank,
                                      world_size, barrier)
    bad = meta["unreadable_images"]
    if len(bad) == len(items):
        raise ValueError(f"none of the {len(items)} {split} images could be read (the list: "
                         f"{meta['unreadable_file']}); the first: {bad[0]['path']}: {bad[0]['error']}")
    return tokens, meta


def _load_or_build(cache, items, device, batch_size, num_workers, get_backbone, rank, world_size, barrier):
    # Rank 0 looks first, holding the lock, so no other run can publish or remove the cache meanwhile: the
    # other ranks, looking after it, see what it saw, and all take the same path through the barriers.
    loaded = load_token_cache(cache) if rank == 0 else None
    barrier()
    if rank != 0:
        loaded = load_token_cache(cache, say=False)
    if loaded is not None:
        return loaded
    if rank != 0:
        barrier()  # rank 0 fetches the backbone's weights first; then the others read them
    backbone = (get_backbone() if get_backbone else load_backbone(cache.backbone)).to(device).eval()
    if rank == 0:
        barrier()
        prepare_token_cache(cache, backbone.width)
    barrier()  # the partial files exist before any rank opens them
    embed_token_share(cache, items, backbone, device, batch_size, num_workers, rank, world_size)
    barrier()  # every row is written before rank 0 checks them
    if rank == 0:
        publish_token_cache(cache, items, backbone.preprocessing)
    barrier()
    loaded = load_token_cache(cache)
    if loaded is None:
        raise RuntimeError(f"{cache.path('.npy')}: the embedding cache just built does not validate")
    return loaded


def load_token_cache(cache: TokenCache, say: bool = True):
    """-> (read-only memmap, description) if the published cache is complete and matches its key, else None
    (saying why when the files are there but wrong)."""
    npy_path, meta_path = cache.path(".npy"), cache.path(".json")
    if not (os.path.isfile(npy_path) and os.path.isfile(meta_path)):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        tokens = np.load(npy_path, mmap_mode="r")
        rows = meta["unreadable"]
        if (meta["key"] == cache.key and tokens.dtype == np.float16 and list(tokens.shape) == meta["shape"]
                and meta.get("crc32") == _crc32(npy_path)
                and tokens.shape[:2] == (cache.images, 1 + cache.grid ** 2)
                and all(0 <= r < len(tokens) for r in rows)
                and rows == [image["row"] for image in meta["unreadable_images"]]):
            return tokens, meta
        reason = "does not match its description"
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"is unreadable ({type(e).__name__}: {e})"
    if say:
        print(f"embedding cache {npy_path} {reason}; rebuilding it")
    return None


def prepare_token_cache(cache: TokenCache, width: int):
    """Rank 0, before any rank embeds: keep the partial files of a stopped build if they are intact (the
    build resumes), else make them afresh: tokens (N, K, width) float16 zeros, done mask all TODO."""
    shape = [cache.images, 1 + cache.grid ** 2, width]
    description = {"key": cache.key, "shape": shape}
    tokens_path, done_path = cache.path(".partial.npy"), cache.path(".partial-done.npy")
    partial_meta = cache.path(".partial.json")
    if os.path.isfile(partial_meta):
        try:
            with open(partial_meta) as f:
                same = json.load(f) == description
            tokens, done = np.load(tokens_path, mmap_mode="r"), np.load(done_path, mmap_mode="r")
            if (same and tokens.dtype == np.float16 and list(tokens.shape) == shape
                    and done.dtype == np.uint8 and done.shape == (cache.images,)):
                print(f"resuming the embedding of {cache.split} images: {int((done != TODO).sum())} of "
                      f"{cache.images} done")
                return
            print(f"{tokens_path}: a partial embedding cache that does not match its description; "
                  f"starting over")
        except (OSError, ValueError) as e:
            print(f"{tokens_path}: a damaged partial embedding cache ({e}); starting over")
    # Remove the files before writing new ones: a stale STEM.npy must never meet a fresh STEM.json.
    remove_orphans(os.path.dirname(cache.stem), os.path.basename(cache.stem))  # what killed writers left
    stale = [cache.path(s) for s in (".npy", ".json", ".unreadable.json", ".partial.json", ".partial.npy",
                                     ".partial-done.npy")]
    stale += glob.glob(cache.path("*.tmp-*")) + glob.glob(cache.path(".partial-unreadable-*.jsonl"))
    for path in stale:
        if os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.dirname(os.path.abspath(tokens_path)), exist_ok=True)
    for path, dtype, size in ((tokens_path, np.float16, shape), (done_path, np.uint8, [cache.images])):
        tmp_path = path + f".tmp-{os.getpid()}.npy"
        np.lib.format.open_memmap(tmp_path, mode="w+", dtype=dtype, shape=tuple(size)).flush()  # sparse zeros
        os.replace(tmp_path, path)
    atomic_write_text(partial_meta, json.dumps(description))  # last: the partial files count once this exists


def embed_token_share(cache: TokenCache, items, backbone, device="cpu", batch_size=32, num_workers=2,
                      rank=0, world_size=1, flush_seconds=10.0) -> int:
    """Embed the rows of this rank's share, rows [N*rank//world_size, N*(rank+1)//world_size), that are
    TODO, into the partial files. Rows are marked done only after their tokens are flushed to disk (at most
    every `flush_seconds`, and when this stops for any reason), so a killed run redoes at most the last few
    seconds of work and never takes a row of zeros for a finished one. -> the number of rows embedded"""
    tokens = np.load(cache.path(".partial.npy"), mmap_mode="r+")  # (N, K, D) float16
    done = np.load(cache.path(".partial-done.npy"), mmap_mode="r+")  # (N,) uint8
    low, high = cache.images * rank // world_size, cache.images * (rank + 1) // world_size
    todo = low + np.flatnonzero(done[low:high] == TODO)
    if len(todo) == 0:
        return 0
    if tokens.shape[2] != backbone.width:
        raise ValueError(f"{cache.path('.partial.npy')}: made for tokens of width {tokens.shape[2]}, but "
                         f"{cache.backbone} gives {backbone.width}")
    dataset = ImageFiles(items, backbone.preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=todo.tolist(),
                                         num_workers=num_workers, worker_init_fn=_one_thread,
                                         pin_memory=torch.device(device).type == "cuda")
    pending_rows, pending_status, pending_errors = [], [], []

    def flush():
        tokens.flush()
        if pending_errors:
            with open(cache.path(f".partial-unreadable-{rank}.jsonl"), "a") as f:
                f.write("".join(json.dumps(e) + "\n" for e in pending_errors))
                f.flush()
                os.fsync(f.fileno())
        if pending_rows:
            done[np.concatenate(pending_rows)] = np.concatenate(pending_status)
            done.flush()
        for pending in (pending_rows, pending_status, pending_errors):
            pending.clear()

    start = last_flush = time.time()
    share = f" (rank {rank} of {world_size})" if world_size > 1 else ""
    desc = f"embedding {cache.split} images with {cache.backbone}{share}"
    try:
        with tqdm(total=len(todo), unit="img", desc=desc) as bar:
            for rows, pixels, errors in loader:
                pixels = pixels.to(device, non_blocking=True)
                with autocast(device, cache.precision):
                    batch = backbone.image_tokens(pixels, cache.grid)  # (b, K, D)
                batch = batch.float().cpu().numpy().astype(np.float16)
                unreadable = np.array([bool(e) for e in errors])
                batch[unreadable] = 0
                rows = rows.numpy()
                tokens[rows] = batch
                pending_rows.append(rows)
                pending_status.append(np.where(unreadable, UNREADABLE, EMBEDDED).astype(np.uint8))
                pending_errors += [{"row": int(r), "error": e} for r, e in zip(rows, errors) if e]
                if time.time() - last_flush > flush_seconds:
                    flush()
                    last_flush = time.time()
                bar.update(len(rows))
    finally:
        flush()  # what was embedded before an error or an interrupt is kept for the next run
    seconds = time.time() - start
    print(f"embedded {len(todo)} {cache.split} images{share} in {seconds:.0f}s "
          f"({len(todo) / seconds:.1f} images/s)")
    return len(todo)


def publish_token_cache(cache: TokenCache, items, preprocessing: dict):
    """Rank 0, after every rank has embedded its share: check that every row is done, write the list of
    unreadable images and the description, then rename the tokens into place."""
    done_path = cache.path(".partial-done.npy")
    done = np.load(done_path, mmap_mode="r")
    if done.shape != (len(items),):
        raise ValueError(f"{done_path}: a done mask for {done.shape[0]} images, not {len(items)}")
    if (done == TODO).any():
        raise RuntimeError(f"{done_path}: {int((done == TODO).sum())} of {len(items)} images are not "
                           f"embedded yet; every rank must finish embed_token_share before the cache is "
                           f"published")
    why, logs = {}, sorted(glob.glob(cache.path(".partial-unreadable-*.jsonl")))
    for path in logs:
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                    record = json.loads(line)
                    why[record["row"]] = record["error"]
    rows = np.flatnonzero(done == UNREADABLE).tolist()
    unreadable = [{"row": r, "cocoid": items[r].cocoid, "path": items[r].path, "error": why.get(r, "unknown")}
                  for r in rows]
    atomic_write_text(cache.path(".unreadable.json"), json.dumps(unreadable, indent=1))
    tokens_path = cache.path(".partial.npy")
    meta = {"key": cache.key, "crc32": _crc32(tokens_path), "split": cache.split, "backbone": cache.backbone,
            "grid": cache.grid, "precision": cache.precision, "images": len(items),
            "shape": list(np.load(tokens_path, mmap_mode="r").shape), "preprocessing": preprocessing,
            "unreadable": rows, "unreadable_file": cache.path(".unreadable.json"),
            "unreadable_images": unreadable}
    # The description first: tokens without it never count, and prepare_token_cache removed any older tokens.
    atomic_write_text(cache.path(".json"), json.dumps(meta, indent=1))
    os.replace(tokens_path, cache.path(".npy"))
    for path in [done_path, cache.path(".partial.json"), *logs]:
        os.remove(path)


def _crc32(path: str) -> int:
    """A checksum of the whole file: damage that keeps its size (a bad disk, a stray write) is caught before
    it turns into NaN losses. About a second per GB."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


class TokenRows:
    """Some rows of a token cache, without copying it: view[i] is cache[rows[i]]; any index numpy takes."""

    def __init__(self, tokens, rows):
        self.tokens, self.rows = tokens, np.asarray(rows, dtype=np.int64)
        self.shape, self.dtype = (len(self.rows), *tokens.shape[1:]), tokens.dtype

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.tokens[self.rows[index]]


def drop_unreadable(items, tokens, meta):
    """-> (items, tokens) without the images that could not be read: the same memmap when every image was
    read, else a TokenRows view whose row i belongs to the i-th kept item."""
    unreadable = set(meta["unreadable"])
    if not unreadable:
        return items, tokens
    rows = [i for i in range(len(items)) if i not in unreadable]  # not empty: cached_image_tokens refuses it
    return [items[i] for i in rows], TokenRows(tokens, rows)
