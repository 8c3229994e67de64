"""
Train a caption decoder on frozen image embeddings.

    python train.py --data-dir data/coco --vision-backbone clip:ViT-B/32   # the original's other defaults
    python train.py --data-dir ../shared/coco-mini --vision-backbone efficientnet-lite0 \
        --language-model runs/small-decoder --lr 1e-3        # offline, on a CPU (see tools/)

Reads a Karpathy-format dataset, computes the backbone's image tokens once per split (cached on disk in
fp16, memory-mapped), then runs a hand-rolled loop: autocast (fp16 + GradScaler, bf16 or fp32), gradient
accumulation whose gradient equals the one big batch, AdamW with warmup + cosine, clipping. After every epoch
it measures validation loss and BLEU-4 (real decoding) and keeps the best epoch in OUT/model.pt; the full
training state goes to OUT/checkpoint.pt so that --resume continues exactly where the run stopped.

Several GPUs: `torchrun --nproc_per_node=N train.py ...` runs DistributedDataParallel; every optimizer step
then sees batch size x accumulation x N captions, and rank 0 alone logs, evaluates and writes files.
"""

import argparse
import contextlib
import datetime
import functools
import glob
import hashlib
import http.client
import io
import json
import math
import os
import random
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner import (ArchiveError, CaptionModel, CaptionerConfig, atomic_torch_save, atomic_write,
                       build_model, check_backbone_name, default_device, load_backbone, preprocess_image,
                       safe_torch_load, save_model, tokenizer_from_data, tokenizer_to_data)

CHECKPOINT_FORMAT = "captioner-checkpoint"
CHECKPOINT_VERSION = 1
CACHE_VERSION = 2

# ---------------------------------------------------------------------------------------------------------
# ---- COCO download ----
# What --data-dir lacks of COCO's Karpathy split is fetched with the standard library alone: Karpathy's split
# file and the 2014 image archives, which stay zipped (read_karpathy reads images straight from them). Sizes
# and SHA-256 as tensorflow/datasets pins them (tensorflow_datasets/url_checksums/coco_captions.txt). The
# archives' sizes also appear in wget logs and other projects' pins; those pin MD5s for the same URLs
# (train2014.zip 0da8c0bd3d6becc4dcb32757491aca88, val2014.zip a3d79f5ed8d289b7a7554ce06a5782b3, e.g.
# salesforce/LAVIS), which one SHA-256 makes unnecessary. Tests point the entries at a local server.

COCO_DOWNLOADS = {
    "caption_datasets.zip": {"url": "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip",
                             "size": 36_745_453,
                             "sha256": "4cfd70132527b80933105e5829dc9034eaab9573482e2e680abbab6130244817"},
    "train2014.zip": {"url": "http://images.cocodataset.org/zips/train2014.zip", "size": 13_510_573_713,
                      "sha256": "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775"},
    "val2014.zip": {"url": "http://images.cocodataset.org/zips/val2014.zip", "size": 6_645_013_297,
                    "sha256": "fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"},
}
COCO_IMAGE_FOLDERS = ("train2014", "val2014")  # Karpathy's "filepath"s; train2014.zip holds train2014/<filename>
DOWNLOAD_ATTEMPTS = 3  # connections per file and run, each resuming where the last one stopped


class DownloadError(RuntimeError):
    pass


def prepare_coco(data_dir: str):
    """Download into data_dir what it lacks of COCO's Karpathy split: dataset_coco.json (from
    caption_datasets.zip) if it is missing, and train2014.zip / val2014.zip for those of the two folders that
    dataset_coco.json names and that are there neither as a folder nor zipped. Nothing for a dataset whose
    dataset_coco.json and images are present. On several processes, call it on one and let the others wait."""
    json_path = os.path.join(data_dir, "dataset_coco.json")
    absent = [folder for folder in COCO_IMAGE_FOLDERS if not os.path.isdir(os.path.join(data_dir, folder))
              and not os.path.isfile(os.path.join(data_dir, folder + ".zip"))]
    if os.path.isfile(json_path) and absent:
        absent = [folder for folder in absent if folder in _named_folders(json_path)]
    names = ([] if os.path.isfile(json_path) else ["caption_datasets.zip"]) + [folder + ".zip" for folder in absent]
    if not names:
        return
    to_fetch = [name for name in names if not os.path.isfile(os.path.join(data_dir, name))]
    missing = sum(COCO_DOWNLOADS[name]["size"] - _part_size(os.path.join(data_dir, name)) for name in to_fetch)
    try:
        if to_fetch:
            os.makedirs(data_dir, exist_ok=True)
            free = shutil.disk_usage(data_dir).free
            if free < missing:
                raise DownloadError(f"{data_dir}: {missing / 1e9:.1f} GB to download, {free / 1e9:.1f} GB free")
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
    """Fetch url into path, with a progress bar. Bytes go to path + ".part", which the next connection (or run)
    continues with an HTTP Range request, or restarts if the server ignores it. The whole file must have the
    published size and SHA-256 before it is renamed to path; a corrupt one is deleted. -> path"""
    if os.path.isfile(path):
        if os.path.getsize(path) != size:
            raise DownloadError(f"{path}: {os.path.getsize(path)} bytes, but the published file has {size}; an "
                                f"incomplete copy? Delete it, or rename it to {os.path.basename(path)}.part to resume")
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
        raise DownloadError(f"{url}: the transfer stopped at {have:,} of {size:,} bytes; run again to resume {part}")
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
            raise DownloadError(f"{url}: the server's file has {have + int(length):,} bytes, the published one "
                                f"{size:,}; has it changed? (see COCO_DOWNLOADS in train.py)")
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=size, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                     desc=os.path.basename(part)[:-len(".part")]) as bar:
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
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True, unit_divisor=1024,
                                     desc=f"checking {os.path.basename(path)}", leave=False) as bar:
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
        raise DownloadError(f"{zip_path}: cannot extract {name} ({e}); delete the file and run again") from None


# ---------------------------------------------------------------------------------------------------------
# ---- dataset ----

def read_karpathy(data_dir: str, split: str) -> list[dict]:
    """Images of one split of a Karpathy-format `dataset_coco.json`: [{cocoid, filename, path, captions}].
    `train` also takes `restval` (the 30k val2014 images Karpathy added to training). An image is the file
    DATA_DIR/filepath/filename or, when only DATA_DIR/filepath.zip is there, its member filepath/filename;
    then the item also has "zip", "member" and the member's "bytes" and "crc" (-1 if it is not in the zip)."""
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
    items, archives = [], {}
    for i, image in enumerate(images):
        try:
            if image["split"] not in wanted:
                continue
            captions = [s["raw"].strip() for s in image["sentences"]]
            items.append({"cocoid": image.get("cocoid", image.get("imgid", i)), "filename": image["filename"],
                          "captions": captions,
                          **_image_source(data_dir, image.get("filepath", ""), image["filename"], archives)})
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: images[{i}] is malformed (missing or wrong {e})") from None
    if not items:
        present = sorted({image.get("split") for image in images if isinstance(image, dict)})
        raise ValueError(f"{path}: split {split!r} has no images (splits present: {present})")
    return items


def _image_source(data_dir: str, folder: str, filename: str, archives: dict) -> dict:
    """Where one image is: {"path"} in a folder, or a zip member (see read_karpathy). `archives` caches each
    folder's zip directory: {folder: None (a folder) or (zip path, {member: (bytes, crc)})}."""
    directory = os.path.join(data_dir, folder)
    if folder not in archives:
        archives[folder] = None
        if not os.path.isdir(directory) and not os.path.isfile(directory + ".zip"):
            raise FileNotFoundError(f"{directory}: no such folder, and no {os.path.basename(directory)}.zip beside "
                                    f"it; {os.path.join(data_dir, 'dataset_coco.json')} names images there")
        if not os.path.isdir(directory):
            try:
                with zipfile.ZipFile(directory + ".zip") as archive:
                    members = {info.filename: (info.file_size, info.CRC) for info in archive.infolist()}
            except (zipfile.BadZipFile, OSError) as e:
                raise ValueError(f"{directory}.zip: not a readable zip archive ({e}); an incomplete download? "
                                 f"Delete it and run again") from None
            archives[folder] = (directory + ".zip", members)
    if archives[folder] is None:
        return {"path": os.path.join(directory, filename)}
    zip_path, members = archives[folder]
    member = f"{folder}/{filename}"
    size, crc = members.get(member, (-1, -1))
    return {"path": os.path.join(zip_path, member), "zip": zip_path, "member": member, "bytes": size, "crc": crc}


class ImageFiles(torch.utils.data.Dataset):
    """Item i -> (i, pixels (3, S, S), error): its image decoded and preprocessed for a backbone (in DataLoader
    workers). An image that cannot be read gives zero pixels and the error's text, so that one bad file among
    100,000 is recorded instead of stopping the run."""

    def __init__(self, items, preprocessing):
        self.sources = [(item["path"], item.get("zip"), item.get("member")) for item in items]
        self.preprocessing = preprocessing
        self._archives, self._pid = {}, None

    def __len__(self):
        return len(self.sources)

    def __getstate__(self):  # open archives stay behind when the dataset is sent to spawned workers
        return {**self.__dict__, "_archives": {}, "_pid": None}

    def _archive(self, zip_path):
        # Each process opens its own handle, on first use: a ZipFile reads through one file position, so a handle
        # inherited across fork and used by several workers at once would hand them each other's bytes.
        if self._pid != os.getpid():
            self._archives, self._pid = {}, os.getpid()
        if zip_path not in self._archives:
            self._archives[zip_path] = zipfile.ZipFile(zip_path)
        return self._archives[zip_path]

    def __getitem__(self, i):
        path, zip_path, member = self.sources[i]
        try:
            image = path
            if zip_path:
                image = Image.open(io.BytesIO(self._archive(zip_path).read(member)))
                image.load()  # decode now, so that a damaged picture fails here
            return i, preprocess_image(image, self.preprocessing), ""
        except Exception as e:  # whatever PIL, zipfile or the file system raise for this one picture
            size = self.preprocessing["size"]
            return i, torch.zeros(3, size, size), f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------------------------------------
# ---- embedding cache ----
# The frozen backbone's image tokens for a split, (N, K, D) float16, computed once and memory-mapped.
# The file names carry a hash of everything that determines the content (backbone, grid, precision, image
# list), so a cache made for anything else is never picked up; a damaged file is detected and rebuilt. The
# tokens are written into a preallocated file with a per-row done mask, so a stopped extraction resumes, and
# several processes on one machine can each fill their share of the rows.

def _backbone_fingerprint(backbone_name: str):
    """A local backbone directory can change under the same name: fold its files' sizes and times in."""
    folder = backbone_name[len("clip:"):] if backbone_name.startswith("clip:") else ""
    if not os.path.isdir(folder):
        return backbone_name
    files = sorted((f, os.path.getsize(os.path.join(folder, f)), os.path.getmtime(os.path.join(folder, f)))
                   for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    return [os.path.abspath(folder), files]


def _image_fingerprint(item) -> list:
    if "zip" in item:
        return [item["bytes"], item["crc"]]  # from the zip's directory: nothing to open
    try:
        return [os.path.getsize(item["path"])]
    except OSError:
        return [-1]  # missing: embedding will list it as unreadable


def embedding_precision(device, precision: str) -> str:
    """What the backbone really runs in: "16" or "bf16" autocast on CUDA; fp32 ("32") elsewhere."""
    if precision not in ("32", "16", "bf16"):
        raise ValueError(f"precision must be 32, 16 or bf16, not {precision!r}")
    return precision if torch.device(device).type == "cuda" else "32"


def cache_paths(cache_dir: str, split: str, backbone_name: str, grid: int, items: list[dict], precision: str = "32"):
    # Which files, where, and how big: a second copy of a dataset with other (say, resized) images gets its own
    # cache. Sizes rather than times, so that copying a dataset keeps its cache valid.
    identity = {"version": CACHE_VERSION, "backbone": _backbone_fingerprint(backbone_name), "grid": grid,
                "precision": precision,
                "images": [[item["cocoid"], os.path.abspath(item["path"]), *_image_fingerprint(item)] for item in items]}
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone_name.split("/")[-1])
    stem = os.path.join(cache_dir, f"{split}-{slug}-grid{grid}-{key}")
    return stem + ".npy", stem + ".json", key


@dataclass(frozen=True)
class TokenCache:
    """One split's cache, all its files named STEM.*. Published: STEM.npy, the tokens (N, K, D) float16;
    STEM.json, their description; STEM.unreadable.json, the images that could not be read. While it is built:
    STEM.partial.npy, preallocated and filled in place; STEM.partial-done.npy, (N,) uint8 per row: 0 to do,
    1 embedded, 2 unreadable; STEM.partial.json, what the partial files are for; and
    STEM.partial-unreadable-<rank>.jsonl, why rows failed."""
    stem: str
    key: str
    split: str
    backbone: str
    grid: int
    precision: str
    images: int  # N

    @classmethod
    def of(cls, items, split, backbone_name, grid, cache_dir, precision="32") -> "TokenCache":
        npy_path, _, key = cache_paths(cache_dir, split, backbone_name, grid, items, precision)
        return cls(npy_path[:-len(".npy")], key, split, backbone_name, grid, precision, len(items))

    def path(self, suffix: str) -> str:
        return self.stem + suffix


def cached_image_tokens(items, split, backbone_name, grid, cache_dir, device="cpu", batch_size=32,
                        num_workers=2, get_backbone=None, precision="32", rank=0, world_size=1, barrier=None):
    """-> (tokens, meta): a read-only memmap (N, K, D) float16 of the split's image tokens, in item order, and
    its description. meta["unreadable"] lists the rows whose image could not be read (zeros; why: in
    meta["unreadable_images"] and the file meta["unreadable_file"]); drop_unreadable leaves them out.

    Built on first use, or resumed where an earlier build stopped. Only then is the backbone loaded
    (`get_backbone()`, default: by name); it runs in `precision` ("32", "16" or "bf16": autocast on CUDA, fp32
    elsewhere). Processes on one machine share the work when each calls this with its `rank` < `world_size`
    and a `barrier` that waits for all of them (torch.distributed.barrier): rank 0 prepares the files, each rank
    embeds its share, rank 0 checks and publishes the cache, then all open it read-only. Callers that
    synchronise otherwise can run those steps themselves: prepare_token_cache, embed_token_share,
    publish_token_cache."""
    barrier = barrier or (lambda: None)
    cache = TokenCache.of(items, split, backbone_name, grid, cache_dir, embedding_precision(device, precision))
    loaded = load_token_cache(cache, say=rank == 0)
    if loaded is None:
        backbone = (get_backbone() if get_backbone else load_backbone(backbone_name)).to(device).eval()
        if rank == 0:
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
    tokens, meta = loaded
    bad = meta["unreadable_images"]
    if len(bad) == len(items):
        raise ValueError(f"none of the {len(items)} {split} images could be read (the list: "
                         f"{meta['unreadable_file']}); the first: {bad[0]['path']}: {bad[0]['error']}")
    if bad and rank == 0:
        print(f"warning: {len(bad)} of {len(items)} {split} images could not be read; their tokens are zeros and "
              f"training leaves them out. The list: {meta['unreadable_file']}. If the cause has gone (a full disk, "
              f"a missing file now restored), delete {cache.path('.*')} to embed the split again")
    return tokens, meta


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
        if meta["key"] == cache.key and tokens.dtype == np.float16 and list(tokens.shape) == meta["shape"] \
                and tokens.shape[:2] == (cache.images, 1 + cache.grid ** 2) and all(0 <= r < len(tokens) for r in rows) \
                and rows == [image["row"] for image in meta["unreadable_images"]]:
            return tokens, meta
        reason = "does not match its description"
    except (OSError, ValueError, KeyError, TypeError) as e:
        reason = f"is unreadable ({type(e).__name__}: {e})"
    if say:
        print(f"embedding cache {npy_path} {reason}; rebuilding it")
    return None


def prepare_token_cache(cache: TokenCache, width: int):
    """Rank 0, before any rank embeds: keep the partial files of a stopped build if they are intact (the build
    resumes), else make them afresh: tokens (N, K, width) float16 preallocated, done mask all zeros."""
    shape = [cache.images, 1 + cache.grid ** 2, width]
    description = {"key": cache.key, "shape": shape}
    tokens_path, done_path, partial_meta = (cache.path(s) for s in (".partial.npy", ".partial-done.npy", ".partial.json"))
    if os.path.isfile(partial_meta):
        try:
            with open(partial_meta) as f:
                same = json.load(f) == description
            tokens, done = np.load(tokens_path, mmap_mode="r"), np.load(done_path, mmap_mode="r")
            if same and tokens.dtype == np.float16 and list(tokens.shape) == shape and done.dtype == np.uint8 \
                    and done.shape == (cache.images,):
                print(f"resuming the embedding of {cache.split} images: {int((done > 0).sum())} of "
                      f"{cache.images} done")
                return
            print(f"{tokens_path}: a partial embedding cache that does not match its description; starting over")
        except (OSError, ValueError) as e:
            print(f"{tokens_path}: a damaged partial embedding cache ({e}); starting over")
    # Remove the files before writing new ones: a stale STEM.npy must never meet a fresh STEM.json.
    for path in [cache.path(s) for s in (".npy", ".json", ".unreadable.json", ".partial.json", ".partial.npy",
                                          ".partial-done.npy")] + glob.glob(cache.path(".partial-unreadable-*.jsonl")):
        if os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.dirname(os.path.abspath(tokens_path)), exist_ok=True)
    for path, dtype, size in ((tokens_path, np.float16, shape), (done_path, np.uint8, [cache.images])):
        tmp_path = path + f".tmp-{os.getpid()}.npy"
        np.lib.format.open_memmap(tmp_path, mode="w+", dtype=dtype, shape=tuple(size)).flush()  # zeros, sparse
        os.replace(tmp_path, path)
    atomic_write_text(partial_meta, json.dumps(description))  # last: the partial files count once this exists


def embed_token_share(cache: TokenCache, items, backbone, device="cpu", batch_size=32, num_workers=2, rank=0,
                      world_size=1, flush_seconds=10.0) -> int:
    """Embed the rows of this rank's share, rows [N*rank//world_size, N*(rank+1)//world_size), that are not done
    yet, into the partial files. Rows are marked done only after their tokens are flushed to disk (at most every
    `flush_seconds`, and when this stops for any reason), so a killed run redoes at most the last few seconds of
    work and never takes a row of zeros for a finished one. -> the number of rows embedded"""
    tokens = np.load(cache.path(".partial.npy"), mmap_mode="r+")  # (N, K, D) float16
    done = np.load(cache.path(".partial-done.npy"), mmap_mode="r+")  # (N,) uint8
    low, high = cache.images * rank // world_size, cache.images * (rank + 1) // world_size
    todo = low + np.flatnonzero(done[low:high] == 0)
    if len(todo) == 0:
        return 0
    if tokens.shape[2] != backbone.width:
        raise ValueError(f"{cache.path('.partial.npy')}: made for tokens of width {tokens.shape[2]}, but "
                         f"{cache.backbone} gives {backbone.width}")
    cuda = torch.device(device).type == "cuda"
    loader = torch.utils.data.DataLoader(ImageFiles(items, backbone.preprocessing), batch_size=batch_size,
                                         sampler=todo.tolist(), num_workers=num_workers, pin_memory=cuda,
                                         worker_init_fn=_one_thread)
    autocast = (torch.autocast("cuda", dtype=torch.float16 if cache.precision == "16" else torch.bfloat16)
                if cuda and cache.precision != "32" else contextlib.nullcontext())
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
    try:
        with tqdm(total=len(todo), unit="img", desc=f"embedding {cache.split} images with {cache.backbone}{share}") as bar:
            for rows, pixels, errors in loader:
                with autocast:
                    batch = backbone.image_tokens(pixels.to(device, non_blocking=True), cache.grid)  # (b, K, D)
                batch = batch.float().cpu().numpy().astype(np.float16)
                unreadable = np.array([bool(e) for e in errors])
                batch[unreadable] = 0
                rows = rows.numpy()
                tokens[rows] = batch
                pending_rows.append(rows)
                pending_status.append(np.where(unreadable, 2, 1).astype(np.uint8))
                pending_errors += [{"row": int(r), "error": e} for r, e in zip(rows, errors) if e]
                if time.time() - last_flush > flush_seconds:
                    flush()
                    last_flush = time.time()
                bar.update(len(rows))
    finally:
        flush()  # what was embedded before an error or an interrupt is kept for the next run
    seconds = time.time() - start
    print(f"embedded {len(todo)} {cache.split} images{share} in {seconds:.0f}s ({len(todo) / seconds:.1f} images/s)")
    return len(todo)


def publish_token_cache(cache: TokenCache, items, preprocessing: dict):
    """Rank 0, after every rank has embedded its share: check that every row is done, write the list of
    unreadable images and the description, then rename the tokens into place."""
    done_path = cache.path(".partial-done.npy")
    done = np.load(done_path, mmap_mode="r")
    if done.shape != (len(items),):
        raise ValueError(f"{done_path}: a done mask for {done.shape[0]} images, not {len(items)}")
    if not done.all():
        raise RuntimeError(f"{done_path}: {int((done == 0).sum())} of {len(items)} images are not embedded yet; "
                           f"every rank must finish embed_token_share before the cache is published")
    why = {}
    for path in sorted(glob.glob(cache.path(".partial-unreadable-*.jsonl"))):
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                    record = json.loads(line)
                    why[record["row"]] = record["error"]
    rows = np.flatnonzero(done == 2).tolist()
    unreadable = [{"row": r, "cocoid": items[r]["cocoid"], "path": items[r]["path"], "error": why.get(r, "unknown")}
                  for r in rows]
    atomic_write_text(cache.path(".unreadable.json"), json.dumps(unreadable, indent=1))
    shape = list(np.load(cache.path(".partial.npy"), mmap_mode="r").shape)
    meta = {"key": cache.key, "split": cache.split, "backbone": cache.backbone, "grid": cache.grid,
            "precision": cache.precision, "images": len(items), "shape": shape, "preprocessing": preprocessing,
            "unreadable": rows, "unreadable_file": cache.path(".unreadable.json"), "unreadable_images": unreadable}
    # The description first: tokens without it never count, and prepare_token_cache removed any older tokens.
    atomic_write_text(cache.path(".json"), json.dumps(meta, indent=1))
    os.replace(cache.path(".partial.npy"), cache.path(".npy"))
    for path in [done_path, cache.path(".partial.json")] + glob.glob(cache.path(".partial-unreadable-*.jsonl")):
        os.remove(path)


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
    """-> (items, tokens) without the images that could not be read: the same memmap when every image was read,
    else a TokenRows view whose row i belongs to the i-th kept item."""
    unreadable = set(meta["unreadable"])
    if not unreadable:
        return items, tokens
    rows = [i for i in range(len(items)) if i not in unreadable]  # not empty: cached_image_tokens refuses that
    return [items[i] for i in rows], TokenRows(tokens, rows)


def _one_thread(_worker_id):
    # Workers only decode and resize JPEGs; left at the default they would each start as many math threads
    # as there are cores and fight the backbone for them.
    torch.set_num_threads(1)


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "captioner", "embeddings")


def atomic_write_text(path: str, text: str):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------------------
# ---- batches ----

def tokenize_captions(tokenizer, items, max_tokens: int) -> list[list[list[int]]]:
    """-> per image, per caption: token ids ending with EOS, at most max_tokens long (EOS included)."""
    texts = [caption for item in items for caption in item["captions"]]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return [[next(encoded)[: max_tokens - 1] + [eos] for _ in item["captions"]] for item in items]


def epoch_order(captions, epoch: int, seed: int, one_caption_per_image: bool) -> list[tuple[int, int]]:
    """(image, caption) pairs of one epoch, shuffled by a generator seeded from (seed, epoch) alone, so the
    order can be recomputed on resume. The original trained one random caption per image per epoch; we
    use every caption by default."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if one_caption_per_image:
        picks = [int(torch.randint(len(c), (1,), generator=generator)) for c in captions]
        pairs = list(enumerate(picks))
    else:
        pairs = [(i, j) for i, c in enumerate(captions) for j in range(len(c))]
    return [pairs[k] for k in torch.randperm(len(pairs), generator=generator).tolist()]


def make_batch(pairs, captions, image_tokens, eos: int, train_padding: bool = False):
    """-> image tokens (B, K, D) float16, input_ids (B, T), labels (B, T) with -100 on padding.
    Each sequence is EOS + caption + EOS; inputs drop the last token, labels drop the first."""
    sequences = [[eos] + captions[i][j] for i, j in pairs]
    T = max(len(s) for s in sequences) - 1
    input_ids = torch.full((len(pairs), T), eos, dtype=torch.long)
    # The original trained padding as EOS; we never put padding in the loss (train_padding recreates it).
    labels = torch.full((len(pairs), T), eos if train_padding else -100, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s) - 1] = torch.tensor(s[:-1])
        labels[row, : len(s) - 1] = torch.tensor(s[1:])
    index = [i for i, _ in pairs]
    tokens = torch.from_numpy(np.ascontiguousarray(image_tokens[index]))  # (B, K, D) fp16
    return tokens, input_ids, labels


# ---------------------------------------------------------------------------------------------------------
# ---- optimisation ----

def get_lr(step: int, total_steps: int, args) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio."""
    if args.lr_schedule == "constant":
        return args.lr
    warmup = max(1, round(args.warmup_fraction * total_steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float, weight_decay: float):
    # Decay matrices only; biases, LayerNorms and the image-slot embedding are not decayed (as in nanoGPT).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "slot" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "slot" in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def labelled_positions(labels):
    """labels (B, T) -> flat indices (N,) of the positions with a label, and those labels (N,)."""
    positions = (labels.flatten() != -100).nonzero().squeeze(1)
    return positions, labels.flatten()[positions]


def sequence_loss_sum(logits, labels):
    """logits (N, V), labels (N,) -> summed (not averaged) token cross-entropy, in fp32."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def accumulate_gradients(model, batches, scaler, args, weight: float = 1.0):
    """Forward and backward over this process's micro-batches of one optimizer step -> (mean token loss of
    the whole window, over all processes, as a tensor; caption tokens in the window).
    Each micro-batch's summed token loss is divided by the caption tokens of the whole window, so the
    accumulated gradient equals that of the one big batch's mean token loss, however the tokens are split
    across micro-batches and processes (a plain mean per micro-batch would over-weight short ones).
    weight=0 runs a batch for its shape only: a process with no captions left in the last window must still
    join the gradient all-reduce."""
    window_tokens = sum(int((labels != -100).sum()) for _, _, labels in batches) * int(weight != 0)
    window_loss = torch.zeros((), device=args.device)
    if args.world_size > 1:
        counts = torch.tensor([float(window_tokens)], device=args.device)
        dist.all_reduce(counts)  # SUM over processes
        window_tokens = int(counts.item())
    # DDP averages gradients over processes; multiplying by the world size turns that average into the sum.
    scale = weight * args.world_size / window_tokens
    for k, (image_tokens, input_ids, labels) in enumerate(batches):
        positions, targets = labelled_positions(labels)  # on the CPU, where no synchronisation is needed
        image_tokens, input_ids = image_tokens.to(args.device, non_blocking=True), input_ids.to(args.device, non_blocking=True)
        positions, targets = positions.to(args.device, non_blocking=True), targets.to(args.device, non_blocking=True)
        # DDP all-reduces gradients during backward; once per optimizer step is enough: the last micro-batch
        last = k == len(batches) - 1
        with model.no_sync() if args.world_size > 1 and not last else contextlib.nullcontext():
            with autocast_context(args):
                logits = model(image_tokens, input_ids, positions)  # (N, V), N = caption tokens
            loss = sequence_loss_sum(logits, targets) * scale
            scaler.scale(loss).backward()
        window_loss += loss.detach()
    if args.world_size > 1:
        dist.all_reduce(window_loss)  # every process sees the same loss, so all stop together if it is bad
    return window_loss / args.world_size, window_tokens


def train_one_epoch(model, optimizer, scaler, data, epoch, state, total_steps, args, log):
    """Run the optimizer steps of one epoch from state['step_in_epoch'] on. Returns False if the run must
    stop early (--stop-after-steps), True when the epoch is complete."""
    model.train()
    pairs = epoch_order(data["captions"], epoch, args.seed, args.one_caption_per_image)
    # A window is one optimizer step: batch size x accumulation x world size captions; the last, shorter
    # window is kept, not dropped. Process r takes every world_size-th caption of it, in micro-batches.
    window_size = args.batch_size * args.accumulate_grad_batches * args.world_size
    windows = [pairs[i:i + window_size] for i in range(0, len(pairs), window_size)]
    interval = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.time()}
    for window_index in range(state["step_in_epoch"], len(windows)):
        lr = get_lr(state["step"], total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = windows[window_index][args.rank::args.world_size]
        # a process with no caption left in the last window runs one, weighted 0, to join the all-reduce
        weight = 1.0 if mine else 0.0
        mine = mine or windows[window_index][:1]
        batches = [make_batch(mine[i:i + args.batch_size], data["captions"], data["tokens"], data["eos"],
                              args.train_padding) for i in range(0, len(mine), args.batch_size)]
        window_loss, window_tokens = accumulate_gradients(model, batches, scaler, args, weight)
        loss_value = float(window_loss)  # checked before the step, so a bad loss never reaches the weights
        if not math.isfinite(loss_value):
            raise SystemExit(f"error: the training loss is {loss_value} at step {state['step']} (epoch {epoch}); "
                             f"stopping. Try a lower --lr, or --precision bf16/32 instead of 16.")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        state["step"] += 1
        state["step_in_epoch"] = window_index + 1
        interval["loss"] += loss_value
        interval["steps"] += 1
        interval["tokens"] += window_tokens
        if state["step"] % args.log_interval == 0 or window_index == len(windows) - 1:
            seconds = time.time() - interval["start"]
            record = {"type": "train", "step": state["step"], "epoch": epoch,
                      "loss": interval["loss"] / interval["steps"], "lr": lr, "grad_norm": float(grad_norm),
                      "ms_per_step": 1000 * seconds / interval["steps"], "tokens_per_s": interval["tokens"] / seconds}
            log(record, f"epoch {epoch} step {state['step']}/{total_steps}: loss {record['loss']:.4f} "
                        f"lr {lr:.2e} grad norm {record['grad_norm']:.2f} {record['ms_per_step']:.0f} ms/step "
                        f"{record['tokens_per_s']:.0f} tokens/s")
            interval = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.time()}
        stop = args.stop_after_steps and state["step"] >= state["start_step"] + args.stop_after_steps
        if stop or (args.checkpoint_every and state["step"] % args.checkpoint_every == 0):
            save_checkpoint(args, model, optimizer, scaler, state, data["tokenizer"])
        if stop:
            return False
    return True


@torch.no_grad()
def validation_loss(model, data, args) -> float:
    """Mean token loss over every validation caption (teacher forcing)."""
    total, tokens = 0.0, 0
    pairs = [(i, j) for i, c in enumerate(data["captions"]) for j in range(len(c))]
    for start in range(0, len(pairs), args.eval_batch_size):
        image_tokens, input_ids, labels = make_batch(pairs[start:start + args.eval_batch_size], data["captions"],
                                                     data["tokens"], data["eos"])
        positions, targets = labelled_positions(labels)
        with autocast_context(args):
            logits = model(image_tokens.to(args.device), input_ids.to(args.device), positions.to(args.device))
        total += float(sequence_loss_sum(logits, targets.to(args.device)))
        tokens += int((labels != -100).sum())
    return total / tokens


def autocast_context(args):
    if args.precision == "32":
        return torch.autocast(device_type=torch.device(args.device).type, enabled=False)
    dtype = torch.float16 if args.precision == "16" else torch.bfloat16
    return torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# ---- checkpoints ----

# Settings that a resumed run must share with the run it continues (others, like --max-epochs, may change).
RESUME_MUST_MATCH = ("vision_backbone", "image_grid", "language_model", "batch_size", "accumulate_grad_batches",
                     "world_size",
                     "seed", "one_caption_per_image", "train_padding", "max_caption_tokens", "data_dir",
                     "max_epochs", "lr", "lr_schedule", "warmup_fraction", "min_lr_ratio", "weight_decay",
                     "grad_clip", "beam_size", "max_length")


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), numpy_state[2], numpy_state[3], numpy_state[4]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_states(states: dict):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(args, model, optimizer, scaler, state, tokenizer):
    """Called by every process (each contributes its RNG state); rank 0 writes OUT/checkpoint.pt."""
    model = getattr(model, "module", model)  # the model inside DistributedDataParallel
    states = [rng_states()]
    if args.world_size > 1:
        states = [None] * args.world_size
        dist.all_gather_object(states, rng_states())
    if args.rank != 0:
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(model.config),
        "tokenizer": tokenizer_to_data(tokenizer),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "state": {k: state[k] for k in ("step", "epoch", "step_in_epoch", "best_bleu4", "best_val_loss")},
        "rng": states,  # one per process
        "args": {k: getattr(args, k) for k in RESUME_MUST_MATCH + ("precision",)},
    }
    atomic_torch_save(checkpoint, os.path.join(args.out_dir, "checkpoint.pt"))


def trim_log(log_path: str, last_step: int):
    """On resume, drop log records of steps after the checkpoint: those steps are about to run again."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the interruption
    if len(kept) != len(lines):
        atomic_write_text(log_path, "".join(kept))
        print(f"{log_path}: dropped {len(lines) - len(kept)} records after step {last_step}, which run again now")


def load_checkpoint(args):
    path = os.path.join(args.out_dir, "checkpoint.pt")
    checkpoint = safe_torch_load(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    missing = {"model", "config", "tokenizer", "optimizer", "scaler", "state", "rng", "args"} - set(checkpoint)
    if missing:
        raise ArchiveError(f"{path}: damaged checkpoint: no {', '.join(sorted(missing))}")
    different = {k: (checkpoint["args"].get(k), getattr(args, k)) for k in RESUME_MUST_MATCH
                 if checkpoint["args"].get(k) != getattr(args, k)}
    if different:
        raise SystemExit(f"error: {path} was written with other settings; resume with the same ones: " +
                         ", ".join(f"--{k.replace('_', '-')} {old!r} (now {new!r})" for k, (old, new) in different.items()))
    return checkpoint


# ---------------------------------------------------------------------------------------------------------
# ---- several processes (torchrun) ----

def setup_distributed(args):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process, rank 0 of 1.
    Sets args.rank, args.world_size and, on CUDA, args.device to this process's GPU."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    if args.world_size == 1:
        return
    if int(os.environ.get("LOCAL_WORLD_SIZE", args.world_size)) != args.world_size:
        raise SystemExit("error: train.py runs on one machine (its processes share the embedding cache through "
                         "memory maps); start torchrun with --nnodes=1")
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")  # gloo runs on CPUs (and the test)
    # Waiting for rank 0 (downloading 20 GB, embedding, evaluating) goes through a CPU group with a long
    # timeout, so that a slow download does not trip the short timeout meant to catch a hung GPU collective.
    args.wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))


def barrier(args):
    if args.world_size > 1:
        dist.barrier(group=args.wait_group)


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

def get_args_parser():
    parser = argparse.ArgumentParser("Train a caption decoder on frozen image embeddings", add_help=True)
    # model
    parser.add_argument("--vision-backbone", default="blip:base",
                        help="frozen image encoder: blip:base (BLIP ViT-B/16 CapFilt-L at 224 px, as LAVIS ran it), "
                             "efficientnet-lite0, clip:ViT-B/32, clip:ViT-B/16, clip:ViT-L/14, clip:ViT-L/14@336px, "
                             "or clip:<local dir>")
    parser.add_argument("--image-grid", type=int, default=3,
                        help="image tokens per image = 1 global + grid x grid pooled patch tokens; "
                             "0 = the single global embedding (the original's design)")
    parser.add_argument("--language-model", default="distilgpt2",
                        help="GPT-2-family decoder: distilgpt2, gpt2, gpt2-medium, or a local directory with a "
                             "saved model and tokenizer")
    # data
    parser.add_argument("--data-dir", default="data/coco",
                        help="folder with a Karpathy-format dataset_coco.json and the images it names")
    parser.add_argument("--cache-dir", default=None,
                        help="where image embeddings are cached (default: $XDG_CACHE_HOME/captioner or "
                             "~/.cache/captioner); the data folder may be read-only")
    parser.add_argument("--max-caption-tokens", type=int, default=40,
                        help="training captions are cut to this many tokens, EOS included")
    parser.add_argument("--one-caption-per-image", action="store_true",
                        help="an epoch sees one random caption per image (the original) instead of all of them")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image decoding workers per process while embedding (default: CPU cores, at most 8)")
    parser.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                        help="fetch what --data-dir lacks of COCO's Karpathy split (dataset_coco.json, train2014.zip "
                             "and val2014.zip: 20 GB, resumable); a dataset_coco.json with its images needs nothing")
    # optimisation
    parser.add_argument("--max-epochs", type=int, default=10, help="passes over the training captions")
    parser.add_argument("--batch-size", type=int, default=32, help="captions per micro-batch")
    parser.add_argument("--accumulate-grad-batches", type=int, default=4,
                        help="micro-batches per optimizer step (effective batch = batch size x this)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="peak learning rate (1e-4 suits fine-tuning distilgpt2; ~1e-3 a small decoder "
                             "trained from scratch)")
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                        help="cosine: linear warmup then cosine decay; constant: the original's fixed LR")
    parser.add_argument("--warmup-fraction", type=float, default=0.05, help="share of all steps spent warming up")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay on weight matrices")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this")
    parser.add_argument("--train-padding", action="store_true",
                        help="train padding positions as EOS (the original's behaviour; for comparison only)")
    parser.add_argument("--precision", choices=["16", "bf16", "32"], default="16",
                        help="16: fp16 autocast + GradScaler; bf16: bf16 autocast; 32: fp32. "
                             "fp16 needs CUDA: on other devices it falls back to 32")
    parser.add_argument("--seed", type=int, default=0, help="seeds every RNG and the data order")
    # evaluation during training
    parser.add_argument("--beam-size", type=int, default=1, help="beams for validation BLEU after each epoch")
    parser.add_argument("--max-length", type=int, default=30, help="most tokens per decoded caption, EOS included")
    parser.add_argument("--eval-batch-size", type=int, default=128, help="images decoded together")
    # run
    parser.add_argument("--out-dir", default="out", help="model.pt, checkpoint.pt and log.jsonl go here")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over even if OUT holds another run")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--log-interval", type=int, default=50, help="optimizer steps per log line")
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="also save OUT/checkpoint.pt every N optimizer steps (0: only after each epoch)")
    parser.add_argument("--stop-after-steps", type=int, default=0,
                        help="save a checkpoint and exit after N optimizer steps of this invocation "
                             "(for time-limited jobs; continue with --resume)")
    return parser


def check_args(args, parser):
    try:
        check_backbone_name(args.vision_backbone)
    except ValueError as e:
        parser.error(f"--vision-backbone: {e}")
    for name in ("max_epochs", "batch_size", "accumulate_grad_batches", "eval_batch_size", "beam_size",
                 "max_length", "log_interval", "max_caption_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_grid < 0 or args.lr <= 0 or args.grad_clip <= 0 or not 0 <= args.warmup_fraction < 1:
        parser.error("--image-grid must be >= 0, --lr and --grad-clip > 0, and --warmup-fraction in [0, 1)")
    args.device = args.device or default_device()
    if args.precision == "16" and torch.device(args.device).type != "cuda":
        print(f"note: fp16 autocast needs CUDA; on {args.device} training runs in fp32 (--precision 32)")
        args.precision = "32"
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.data_dir = os.path.abspath(args.data_dir)


def main(args):
    setup_distributed(args)
    try:
        run_training(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(args):
    is_main = args.rank == 0  # logs, evaluates and writes files
    say = print if is_main else (lambda *a, **k: None)
    run_files = [os.path.join(args.out_dir, f)
                 for f in ("checkpoint.pt", "model.pt", "log.jsonl", "metrics.json", "captions.jsonl")]
    if args.resume and not os.path.isfile(run_files[0]):
        raise SystemExit(f"error: --resume: {run_files[0]} does not exist")
    if not args.resume and not args.overwrite and any(os.path.exists(f) for f in run_files):
        raise SystemExit(f"error: {args.out_dir} already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out-dir")
    checkpoint = load_checkpoint(args) if args.resume else None

    # data: captions and cached image tokens
    if args.download and is_main:  # one process downloads; torchrun stops the others if it fails
        prepare_coco(args.data_dir)
    barrier(args)
    splits = {split: read_karpathy(args.data_dir, split) for split in ("train", "val")}
    if checkpoint:
        try:
            model = CaptionModel(CaptionerConfig(**checkpoint["config"]))
            model.load_state_dict(checkpoint["model"])
            tokenizer = tokenizer_from_data(checkpoint["tokenizer"])
        except Exception as e:
            raise ArchiveError(f"{args.out_dir}/checkpoint.pt: damaged checkpoint: {e}") from None
    @functools.cache  # loaded only if a cache is built, then kept for the other split
    def get_backbone():
        if not is_main:
            barrier(args)  # rank 0 downloads the backbone's weights (once); then the others read them
        backbone = load_backbone(args.vision_backbone)
        if is_main:
            barrier(args)
        return backbone
    tokens, cache_meta = {}, {}
    for split, items in splits.items():
        # with several processes, each embeds its share of the images
        tokens[split], cache_meta[split] = cached_image_tokens(
            items, split, args.vision_backbone, args.image_grid, args.cache_dir, args.device,
            num_workers=args.num_workers, get_backbone=get_backbone, precision=args.precision,
            rank=args.rank, world_size=args.world_size, barrier=lambda: barrier(args))
        splits[split], tokens[split] = drop_unreadable(items, tokens[split], cache_meta[split])  # never train on zeros
    get_backbone.cache_clear()  # frozen and cached: the backbone is not needed for training
    preprocessing = cache_meta["train"]["preprocessing"]  # stored in model.pt, checked when it is loaded

    # Seed here, after the cache: loading a backbone to build it draws random numbers (weight init), and
    # whether that happened must not change the decoder's initialisation or the dropout masks.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # also seeds every CUDA device
    if not checkpoint:
        model, tokenizer = build_model(args.language_model, args.vision_backbone,
                                       image_width=tokens["train"].shape[2], image_grid=args.image_grid)
    # Every process starts from the same weights, but each must draw its own dropout masks.
    torch.manual_seed(args.seed + args.rank)
    positions = model.decoder.config.n_positions
    if max(args.max_caption_tokens, args.max_length) > positions:
        raise SystemExit(f"error: {args.language_model} reads at most {positions} tokens; lower "
                         f"--max-caption-tokens ({args.max_caption_tokens}) and --max-length ({args.max_length})")
    model.to(args.device)
    if torch.device(args.device).type == "cuda":
        # TF32 matmuls for the fp32 parts (all of --precision 32): ~fp32 accuracy at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = {split: {"captions": tokenize_captions(tokenizer, items, args.max_caption_tokens),
                    "tokens": tokens[split], "eos": tokenizer.eos_token_id, "tokenizer": tokenizer}
            for split, items in splits.items()}

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.precision == "16")
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_bleu4": -1.0, "best_val_loss": math.inf}
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] and scaler.is_enabled():  # empty when the run so far was not fp16
            scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint["args"]["precision"] != args.precision:
            print(f"note: the run so far used --precision {checkpoint['args']['precision']}, now {args.precision}")
        state.update(checkpoint["state"])
        set_rng_states(checkpoint["rng"][args.rank])
    state["start_step"] = state["step"]
    # Gradients are averaged over processes during backward; the optimizer then steps identically everywhere.
    train_model = model
    if args.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[torch.device(args.device)] if
                                              torch.device(args.device).type == "cuda" else None)

    train_captions = sum(len(c) for c in data["train"]["captions"])
    captions_per_epoch = len(splits["train"]) if args.one_caption_per_image else train_captions
    effective_batch = args.batch_size * args.accumulate_grad_batches * args.world_size
    steps_per_epoch = math.ceil(captions_per_epoch / effective_batch)
    total_steps = steps_per_epoch * args.max_epochs
    params = sum(p.numel() for p in model.parameters())
    say(f"device {args.device}, precision {args.precision}, decoder {args.language_model} "
          f"({params / 1e6:.1f}M parameters), backbone {args.vision_backbone}, "
          f"{model.config.num_image_tokens} image tokens per image")
    say(f"train {len(splits['train'])} images / {train_captions} captions, val {len(splits['val'])} images; "
          f"{captions_per_epoch} captions per epoch")
    say(f"effective batch {args.batch_size} x {args.accumulate_grad_batches} x {args.world_size} process"
        f"{'es' if args.world_size > 1 else ''} = {effective_batch} captions; {steps_per_epoch} optimizer steps per epoch, "
          f"{total_steps} in all; peak LR {args.lr:g} ({args.lr_schedule})")
    say(f"outputs: {args.out_dir}/model.pt (best epoch by val BLEU-4), checkpoint.pt, log.jsonl; "
          f"embedding cache {args.cache_dir}")
    if checkpoint:
        say(f"resuming at epoch {state['epoch']}, step {state['step']} ({state['step_in_epoch']} into the epoch)")

    # Everything is in place: only now replace an old run (--overwrite) or forget what followed the checkpoint.
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        if args.overwrite and not args.resume:
            for f in run_files:
                if os.path.exists(f):
                    os.remove(f)
        if checkpoint:
            trim_log(log_path, state["step"])

    def log(record, line):
        if not is_main:
            return
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    from evaluate import decode_image_tokens, bleu4_coco  # evaluate.py imports this file, so import late

    for epoch in range(state["epoch"], args.max_epochs):
        state["epoch"] = epoch
        epoch_start = time.time()
        if not train_one_epoch(train_model, optimizer, scaler, data["train"], epoch, state, total_steps, args, log):
            say(f"stopped after {args.stop_after_steps} steps; continue with --resume")
            return
        state.update(epoch=epoch + 1, step_in_epoch=0)
        if not is_main:  # rank 0 alone evaluates; the others wait for it here, then all save the checkpoint
            barrier(args)
            save_checkpoint(args, model, optimizer, scaler, state, tokenizer)
            continue
        # validation: teacher-forced loss and BLEU-4 of real decoding (decoding leaves the mode to its caller)
        model.eval()
        val_loss = validation_loss(model, data["val"], args)
        captions = decode_image_tokens(model, tokenizer, data["val"]["tokens"], args.beam_size, args.device,
                                       args.eval_batch_size, args.max_length)
        val_bleu4 = bleu4_coco(captions, [item["captions"] for item in splits["val"]])
        model.train()
        # best by validation BLEU-4; ties (0.0 early on, say) go to the lower validation loss
        best = (val_bleu4, -val_loss) > (state["best_bleu4"], -state["best_val_loss"])
        if best:
            state["best_bleu4"], state["best_val_loss"] = val_bleu4, val_loss
            save_model(os.path.join(args.out_dir, "model.pt"), model, tokenizer, preprocessing,
                       {"epoch": epoch, "step": state["step"], "val_bleu4_coco": val_bleu4, "val_loss": val_loss,
                        "beam_size": args.beam_size, "embedding_precision": cache_meta["train"]["precision"]})
        log({"type": "epoch", "epoch": epoch, "step": state["step"], "val_loss": val_loss, "val_bleu4": val_bleu4,
             "best": best, "seconds": time.time() - epoch_start, "example": captions[0]},
            f"epoch {epoch}: val loss {val_loss:.4f}, val BLEU-4 {val_bleu4:.4f} (beam {args.beam_size})"
            f"{' (best so far, saved model.pt)' if best else ''}; e.g. {captions[0]!r}")
        barrier(args)
        save_checkpoint(args, model, optimizer, scaler, state, tokenizer)
    say(f"done: best val BLEU-4 {state['best_bleu4']:.4f}; model in {args.out_dir}/model.pt")


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(args, parser)
    try:
        main(args)
    except (ArchiveError, DownloadError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
