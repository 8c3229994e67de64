"""
The data under train.py, evaluate.py and scst.py: a split of a captioned dataset, its captions as token ids,
and the frozen backbone's image tokens for its images, computed once and cached.

    items = read_split("data/coco", "val")                # [SplitImage(cocoid, filename, captions, source)]
    items, tokens, meta = split_image_tokens(items, "val", "blip:base", 3, default_cache_dir())
    tokens[i]                                             # (K, D) float16, the image tokens of items[i]

In reading order: a split of the dataset (COCO's or Flickr's Karpathy JSON, or Hugging Face's imagefolder),
captions to token ids, and the one entry point from images to cached image tokens. The machinery lives in
support/: the dataset layouts (datasets.py), the COCO download (coco_download.py), reading an image from a
folder or a zip (images.py), and the cache's files, resumable and shared by processes (embedding_cache.py).
"""

import functools
import os
import zipfile
from dataclasses import dataclass, field

from captioner import image_tokens
from support.backbones import load_backbone
from support.coco_download import DownloadError, prepare_coco  # noqa: F401  (DownloadError: for train.py)
from support.datasets import DatasetError, is_coco_folder, read_dataset  # noqa: F401 (for the scripts)
from support.embedding_cache import default_cache_dir, drop_unreadable, load_or_build_cache  # noqa: F401
from support.images import ImageSource
from support.processes import Processes, autocast, embedding_precision
from support.views import VIEWS, mirrorable, view_pixels, view_tokens

# ---------------------------------------------------------------------------------------------------------
# ---- the split ----

@dataclass(frozen=True)
class SplitImage:
    cocoid: int
    filename: str
    captions: list = field(hash=False)  # raw caption strings
    source: ImageSource

    @property
    def path(self) -> str:
        return self.source.path


def read_split(data_dir: str, split: str, val_share: float = 0.05, test_share: float = 0.05,
               need_captions: bool = True) -> list[SplitImage]:
    """Images of one split (train, val or test) of the dataset in data_dir, in whichever layout it comes
    (support/datasets.py: Karpathy's JSON for COCO and Flickr, or Hugging Face's imagefolder). Karpathy's
    `train` also takes `restval` (the 30k val2014 images Karpathy added to training); a COCO image folder may
    stay zipped (DATA_DIR/train2014.zip). Entries that name one image are merged into one, their captions
    united; captions that are not valid Unicode are repaired; images without captions are left out (or, with
    need_captions=False, a split without any is returned uncaptioned); each is said once."""
    records, description = _dataset(os.path.abspath(data_dir), val_share, test_share)
    wanted = ("train", "restval") if split == "train" else (split,)
    by_name, archives, report = {}, {}, {"uncaptioned": [], "empty": 0, "repaired": [], "merged": []}
    for record in records:
        if record["split"] not in wanted:
            continue
        folder, filename = record["folder"], record["filename"]
        if not isinstance(folder, str) or not isinstance(filename, str) or not filename:
            raise ValueError(f"{record['listed_in']} is malformed (missing or wrong filepath/filename)")
        if not _inside(data_dir, folder, filename):
            raise ValueError(f"{record['listed_in']} names {os.path.join(folder, filename)!r}, which is not "
                             f"inside {data_dir}; refusing to read it")
        captions = [valid_text(c).strip() for c in record["captions"]]
        if any(c != raw.strip() for c, raw in zip(captions, record["captions"])):
            report["repaired"].append(f"{record['listed_in'].split(': ')[-1]} ({filename})")
        report["empty"] += captions.count("")
        captions = [caption for caption in captions if caption]
        if not captions and need_captions:  # nothing to learn from or to score against
            report["uncaptioned"].append(record["id"])
            continue
        source = _image_source(data_dir, folder, filename, archives, record["listed_in"])
        if source.name in by_name:  # the same picture listed again: one image with every caption
            first = by_name[source.name]
            by_name[source.name] = SplitImage(first.cocoid, first.filename,
                                              list(dict.fromkeys(first.captions + captions)), first.source)
            report["merged"].append(source.name)
        else:
            by_name[source.name] = SplitImage(record["id"], filename, captions, source)
    _report(description.split(",")[0], split, report)
    if not by_name:
        present = sorted({r["split"] for r in records if isinstance(r["split"], str)})
        raise ValueError(f"{data_dir} ({description}): split {split!r} has no images"
                         f"{' with captions' if need_captions else ''} (splits present: {present})")
    return list(by_name.values())


@functools.lru_cache(maxsize=4)
def _dataset_cached(data_dir: str, val_share: float, test_share: float, stamp: tuple):
    records, description = read_dataset(data_dir, val_share, test_share)
    print(f"dataset: {description}")  # once per process and dataset
    return records, description


def _dataset(data_dir: str, val_share: float, test_share: float):
    """read_dataset, parsed once per process until a file of the folder's top level changes."""
    stamp = tuple(sorted((entry.name, entry.stat().st_mtime_ns) for entry in os.scandir(data_dir)
                         if entry.is_file())) if os.path.isdir(data_dir) else ()
    return _dataset_cached(data_dir, val_share, test_share, stamp)


def valid_text(text: str) -> str:
    """`text` with what is not valid Unicode (a lone surrogate, which JSON's \\ud800 escapes can make and no
    encoder takes) replaced by U+FFFD; surrogate pairs become the character they encode."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _report(dataset: str, split: str, report: dict):
    """Say once what reading the split left out, merged or repaired."""
    def first(names: list) -> str:
        return ", ".join(map(str, names[:3])) + (" ..." if len(names) > 3 else "")
    if report["uncaptioned"]:
        print(f"warning: {dataset}: {len(report['uncaptioned'])} {split} images have no caption and are left "
              f"out (cocoids {report['uncaptioned'][:5]}{' ...' if len(report['uncaptioned']) > 5 else ''})")
    if report["empty"]:
        print(f"warning: {dataset}: {report['empty']} empty {split} captions are left out")
    if report["merged"]:
        print(f"warning: {dataset}: {len(report['merged'])} {split} entries name an image listed before; each "
              f"is merged into the first, captions united ({first(report['merged'])})")
    if report["repaired"]:
        print(f"warning: {dataset}: captions of {len(report['repaired'])} {split} entries are not valid Unicode "
              f"(lone surrogates); those characters are replaced by U+FFFD ({first(report['repaired'])})")


def _inside(data_dir: str, folder: str, filename: str) -> bool:
    """Whether folder/filename (from the split file, so untrusted) stays inside data_dir: relative, without
    '..' or a NUL. Symbolic links are the data folder owner's own choice (train2014 -> /datasets/...): the
    split file cannot make one, so they are followed."""
    if not isinstance(folder, str) or not isinstance(filename, str) or not filename:
        raise TypeError("filepath/filename")
    relative = os.path.join(folder, filename)
    return not (os.path.isabs(relative) or "\0" in relative
                or ".." in relative.replace("\\", "/").split("/"))


def _image_source(data_dir: str, folder: str, filename: str, archives: dict, listed_in: str) -> ImageSource:
    """`archives` caches each folder's zip directory:
    {folder: None (a folder) or (zip path, {member: (size, crc)})}."""
    directory = os.path.join(data_dir, folder)
    if folder not in archives:
        archives[folder] = None
        if not os.path.isdir(directory) and not os.path.isfile(directory + ".zip"):
            raise FileNotFoundError(f"{directory}: no such folder, and no {os.path.basename(directory)}.zip "
                                    f"beside it; {listed_in} names an image there")
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


def add_captions(splits: dict, tokenizer, max_tokens: int):
    """Give each split of training_splits its captions as token ids ("captions", see tokenize_captions), its
    raw references, and the tokenizer and EOS id that decoding needs."""
    for split in splits.values():
        split.update(captions=tokenize_captions(tokenizer, split["items"], max_tokens),
                     references=[item.captions for item in split["items"]], eos=tokenizer.eos_token_id,
                     tokenizer=tokenizer, host_tokens=split["tokens"])


def tokenize_captions(tokenizer, items, max_tokens: int) -> list[list[list[int]]]:
    """-> per image, per caption: token ids ending with EOS, at most max_tokens long (EOS included)."""
    texts = [caption for item in items for caption in item.captions]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return [[next(encoded)[: max_tokens - 1] + [eos] for _ in item.captions] for item in items]


# ---------------------------------------------------------------------------------------------------------
# ---- image tokens ----

def token_encoder(grid: int, device, precision: str, view: str = ""):
    """-> encode(backbone, pixels (b, 3, S, S)) -> image tokens (b, K, D): captioner.image_tokens of the
    pixels, or of an augmented `view` of them (support/views.py), with the backbone run in `precision` ("32",
    "16" or "bf16": autocast on CUDA, fp32 elsewhere)."""
    precision = embedding_precision(device, precision)

    def encode(backbone, pixels):
        with autocast(device, precision):
            return image_tokens(backbone, view_pixels(view, pixels) if view else pixels, grid)
    return encode


def cached_image_tokens(items, split: str, backbone_name: str, grid: int, cache_dir: str, *, device="cpu",
                        precision="32", num_workers=2, batch_size=32, get_backbone=None,
                        processes: Processes | None = None, view: str = ""):
    """-> (tokens, meta): tokens[i] (K, D) float16, a read-only memmap row, is captioner.image_tokens of
    items[i] with this backbone and grid, the backbone run in `precision`; rows whose image could not be read
    are zeros, listed in meta["unreadable"] (why: meta["unreadable_images"], and the file
    meta["unreadable_file"]). The first call embeds the split (resumably, several processes sharing the work)
    and caches it in cache_dir; later ones read the cache (support/embedding_cache.py). With `view`, the
    tokens are of that augmented view of each image (support/views.py), cached beside the plain ones."""
    processes = processes or Processes(device=device)
    return load_or_build_cache(items, split, backbone_name, grid, cache_dir,
                               encode=token_encoder(grid, device, precision, view), device=device, view=view,
                               precision=embedding_precision(device, precision), batch_size=batch_size,
                               num_workers=num_workers, get_backbone=get_backbone, rank=processes.rank,
                               world_size=processes.world_size, barrier=processes.barrier)


def split_image_tokens(items, split: str, backbone_name: str, grid: int, cache_dir: str, *, device="cpu",
                       precision="32", num_workers=2, batch_size=32, get_backbone=None,
                       processes: Processes | None = None):
    """The entry point: -> (items, tokens, meta) for the images of a split that could be read, tokens[i]
    belonging to items[i]; the others are left out, with a warning that names the list of them. The
    arguments are cached_image_tokens'."""
    tokens, meta = cached_image_tokens(items, split, backbone_name, grid, cache_dir, device=device,
                                       precision=precision, num_workers=num_workers, batch_size=batch_size,
                                       get_backbone=get_backbone, processes=processes)
    bad = meta["unreadable_images"]
    if bad and (processes is None or processes.is_main):
        print(f"warning: {len(bad)} of {len(items)} {split} images could not be read and are left out. The "
              f"list: {meta['unreadable_file']}. If the cause has gone (a missing file now restored), delete "
              f"{meta['unreadable_file'][:-len('.unreadable.json')]}.* to embed the split again")
    return (*drop_unreadable(items, tokens, meta), meta)


def training_splits(data_dir, backbone_name, grid, cache_dir, precision, num_workers, processes: Processes,
                    download=False, val_share=0.05, test_share=0.05, views: int = 0) -> dict:
    """-> {"train": ..., "val": ...}: each split's readable images ("items"), their cached image tokens
    ("tokens") and the backbone's "preprocessing", for train.py and scst.py. With download, rank 0 fetches
    what data_dir lacks of COCO first. The train split also gets "all_views": its tokens, then those of its
    images' first `views` augmented views (support/views.py), and whether each image may be mirrored
    ("mirror_ok")."""
    if download and processes.is_main and is_coco_folder(data_dir):
        # what data_dir lacks of COCO; torchrun stops the other processes if this fails
        prepare_coco(data_dir)
    processes.barrier()
    get_backbone = functools.cache(lambda: load_backbone(backbone_name))  # once, for both splits
    splits = {}
    for split in ("train", "val"):
        every_item = read_split(data_dir, split, val_share, test_share)
        options = dict(device=processes.device, precision=precision, num_workers=num_workers,
                       get_backbone=get_backbone, processes=processes)
        items, tokens, meta = split_image_tokens(every_item, split, backbone_name, grid, cache_dir, **options)
        splits[split] = {"items": items, "tokens": tokens, "preprocessing": meta["preprocessing"]}
        if split == "train":  # the plain tokens, then each view's
            splits[split]["all_views"] = [tokens] + [
                view_tokens(cached_image_tokens(every_item, split, backbone_name, grid, cache_dir, **options,
                                                view=view), every_item, meta) for view in VIEWS[:views]]
            splits[split]["mirror_ok"] = [mirrorable(item.captions) for item in items]
    shared = {item.source.name for item in splits["train"]["items"]} & \
        {item.source.name for item in splits["val"]["items"]}
    if shared and processes.is_main:  # validation would then flatter the model
        print(f"warning: {len(shared)} images are in both the train and the val split (e.g. {min(shared)})")
    return splits
