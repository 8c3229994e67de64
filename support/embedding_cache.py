"""The embedding cache: the frozen backbone's image tokens for a split, (N, K, D) float16, computed once and
memory-mapped. The file names carry a hash of everything that determines the content (backbone, grid,
precision, and each image's name inside the data folder and size), so a cache made for anything else is
never picked up, while a data folder that is moved or copied keeps its cache. One split's files, all named
STEM.*, live like this:

  prepare (rank 0)   STEM.partial.npy (N, K, D) zeros, STEM.partial-done.npy (N,) all TODO,
                     then STEM.partial.json, which makes the two count (a stopped build resumes from them)
  embed (each rank   rows of its share -> STEM.partial.npy; flushed, then marked EMBEDDED or UNREADABLE in
   its share)        STEM.partial-done.npy; why a row is unreadable -> STEM.partial-unreadable-<rank>.jsonl
  publish (rank 0)   STEM.unreadable.json and STEM.json, then STEM.partial.npy renamed to STEM.npy;
                     the other partial files removed
  use                STEM.npy memory-mapped read-only, if STEM.json describes it (else it is rebuilt)
"""

import contextlib
import glob
import hashlib
import json
import os
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from support.backbones import load_backbone
from support.files import atomic_write_text, file_lock, remove_orphans
from support.images import ImageFiles, one_thread

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
    view: str = ""  # an augmented view (support/views.py), or "" for the plain image

    @classmethod
    def of(cls, items, split, backbone_name, grid, cache_dir, precision="32", view="") -> "TokenCache":
        identity = {"version": CACHE_VERSION, "backbone": _backbone_fingerprint(backbone_name), "grid": grid,
                    "precision": precision,
                    "images": [[item.cocoid, item.source.name, *item.source.fingerprint()] for item in items]}
        if view:  # only then, so that the plain view keeps the key it always had
            identity["view"] = view
        key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
        slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone_name.split("/")[-1])
        view_slug = f"-{view.replace(' ', '-')}" if view else ""
        stem = os.path.join(cache_dir, f"{split}{view_slug}-{slug}-grid{grid}-{key}")
        return cls(stem, key, split, backbone_name, grid, precision, len(items), view)

    def path(self, suffix: str) -> str:
        return self.stem + suffix


def load_or_build_cache(items, split: str, backbone_name: str, grid: int, cache_dir: str, *, encode,
                        device="cpu", precision="32", batch_size=32, num_workers=2, get_backbone=None, rank=0,
                        world_size=1, barrier=None, view=""):
    """-> (tokens, meta): a read-only memmap (N, K, D) float16 of the split's image tokens, in item order,
    and its description. meta["unreadable"] lists the rows whose image could not be read (zeros; why: in
    meta["unreadable_images"] and the file meta["unreadable_file"]).

    Built on first use, or resumed where an earlier build stopped. Only then is the backbone loaded
    (`get_backbone()`, default: by name), and encode(backbone, pixels (b, 3, S, S)) -> (b, K, D) makes the
    tokens; `precision` (what the backbone runs in) and `view` (an augmented view that encode makes, see
    support/views.py) are part of the cache's key. Processes on one machine share
    the work when each calls this with its `rank` < `world_size` and a `barrier` that waits for all of them:
    rank 0 loads the backbone first (a download happens once), prepares the files, each rank embeds its
    share, rank 0 checks and publishes the cache, then all open it."""
    barrier = barrier or (lambda: None)
    cache = TokenCache.of(items, split, backbone_name, grid, cache_dir, precision, view)
    lock_path = cache.path(".lock")
    try:
        os.makedirs(cache_dir, exist_ok=True)
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666))  # a read-only folder fails here
    except OSError as e:
        raise OSError(f"{cache_dir}: cannot write the embedding cache here ({e.strerror}); choose another "
                      f"--cache-dir") from None
    lock = file_lock(lock_path, f"the {split} embedding cache") if rank == 0 else contextlib.nullcontext()
    with lock:  # a second run on the same cache waits, then reuses what the first one built
        # Rank 0 looks first, holding the lock, so no other run can publish or remove the cache meanwhile:
        # the other ranks, looking after it, see what it saw, and all take the same path through the barriers.
        loaded = load_token_cache(cache) if rank == 0 else None
        barrier()
        if rank != 0:
            loaded = load_token_cache(cache, say=False)
        if loaded is None:
            get_backbone = get_backbone or (lambda: load_backbone(backbone_name))
            loaded = build_token_cache(cache, items, encode, get_backbone, device, batch_size, num_workers,
                                       rank, world_size, barrier)
    tokens, meta = loaded
    bad = meta["unreadable_images"]
    if len(bad) == len(items):
        raise ValueError(f"none of the {len(items)} {split} images could be read (the list: "
                         f"{meta['unreadable_file']}); the first: {bad[0]['path']}: {bad[0]['error']}")
    return tokens, meta


def build_token_cache(cache, items, encode, get_backbone, device, batch_size, num_workers, rank, world_size,
                      barrier):
    """Every rank: prepare (rank 0), embed a share each, publish (rank 0), then open the cache."""
    if rank != 0:
        barrier()  # rank 0 fetches the backbone's weights first; then the others read them
    backbone = get_backbone().to(device).eval()
    if rank == 0:
        barrier()
        prepare_token_cache(cache, backbone.width)
    barrier()  # the partial files exist before any rank opens them
    embed_token_share(cache, items, backbone, encode, device, batch_size, num_workers, rank, world_size)
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
    stale += glob.glob(glob.escape(cache.stem) + "*.tmp-*") + unreadable_logs(cache)
    for path in stale:
        if os.path.exists(path):
            os.remove(path)
    os.makedirs(os.path.dirname(os.path.abspath(tokens_path)), exist_ok=True)
    for path, dtype, size in ((tokens_path, np.float16, shape), (done_path, np.uint8, [cache.images])):
        tmp_path = path + f".tmp-{os.getpid()}.npy"
        np.lib.format.open_memmap(tmp_path, mode="w+", dtype=dtype, shape=tuple(size)).flush()  # sparse zeros
        os.replace(tmp_path, path)
    atomic_write_text(partial_meta, json.dumps(description))  # last: the partial files count once this exists


def unreadable_logs(cache: TokenCache) -> list[str]:
    """The ranks' lists of unreadable rows. The stem is escaped: a --cache-dir may hold [ or *."""
    return sorted(glob.glob(glob.escape(cache.stem) + ".partial-unreadable-*.jsonl"))


def embed_token_share(cache: TokenCache, items, backbone, encode, device="cpu", batch_size=32, num_workers=2,
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
    dataset = ImageFiles([item.source for item in items], backbone.preprocessing)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=todo.tolist(),
                                         num_workers=num_workers, worker_init_fn=one_thread,
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
    view = f" ({cache.view} view)" if cache.view else ""
    desc = f"embedding {cache.split} images{view} with {cache.backbone}{share}"
    try:
        with tqdm(total=len(todo), unit="img", desc=desc) as bar:
            for rows, pixels, errors in loader:
                pixels = pixels.to(device, non_blocking=True)
                batch = encode(backbone, pixels)  # (b, K, D)
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
    print(f"embedded {len(todo)} {cache.split} images{view}{share} in {seconds:.0f}s "
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
    why, logs = {}, unreadable_logs(cache)
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
