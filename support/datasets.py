"""Captioned datasets in the layouts people already have, read into one list of records.

  Karpathy's JSON      dataset_coco.json, dataset_flickr8k.json or dataset_flickr30k.json: {"images": [{
                       "filepath" (optional), "filename", "split", "cocoid" or "imgid", "sentences":
                       [{"raw"}]}]}. Without "filepath", the images are beside the file or in the one
                       subfolder that holds them (Flickr's flickr30k-images/, say).
  Hugging Face's       metadata.jsonl or metadata.csv, one row per image (or per caption), a "file_name"
  imagefolder          relative to the metadata's folder, the captions in "text" or "caption" (a string) or
                       "captions" (a list; in a CSV, a JSON list). Splits: train/, validation/ (or val/) and
                       test/ folders each with its metadata; or one metadata file with a "split" column; or
                       one without, split here by a hash of each file name (adding images never moves the
                       old ones) into --val-share and --test-share.

Records: {"split": train|restval|val|test, "folder", "filename" (folder/filename relative to the data folder),
"id", "captions": [str], "listed_in": the file and row that named it}. What other tools silently ignore
(metadata where the layout does not look, a misspelt metadata name, no caption column, a file name outside the
folder or missing, a split with no images) is a DatasetError naming the file and the problem.
"""

import csv
import hashlib
import json
import os

KARPATHY_FILES = ("dataset_coco.json", "dataset_flickr8k.json", "dataset_flickr30k.json")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")
SPLIT_FOLDERS = {"train": "train", "validation": "val", "val": "val", "test": "test"}  # folder -> split
SPLIT_NAMES = {"train": "train", "restval": "restval", "validation": "val", "val": "val", "valid": "val",
               "test": "test"}  # a "split" column's values -> ours
CAPTION_COLUMNS = ("text", "caption", "captions")


class DatasetError(ValueError):
    """A dataset that cannot be read as it is, with the file and the problem."""


def read_dataset(data_dir: str, val_share: float = 0.05, test_share: float = 0.05) -> tuple[list, str]:
    """-> (records of every split, a one-line description: "imagefolder, metadata.jsonl, 3 splits")."""
    if not os.path.isdir(data_dir):
        raise DatasetError(f"{data_dir}: no such folder")
    karpathy = [name for name in KARPATHY_FILES if os.path.isfile(os.path.join(data_dir, name))]
    if karpathy:
        return read_karpathy_file(data_dir, karpathy)
    return read_imagefolder(data_dir, val_share, test_share)


COCO_FILES = {"dataset_coco.json", "caption_datasets.zip", "train2014", "train2014.zip", "val2014", "val2014.zip"}


def is_coco_folder(data_dir: str) -> bool:
    """Whether data_dir may receive COCO's downloads: absent, empty, or holding only COCO's files (a folder
    with anything else is someone's own dataset, which a download must not fill with 20 GB)."""
    if not os.path.isdir(data_dir):
        return True
    return all(name.removesuffix(".part") in COCO_FILES or name.startswith(".") for name in os.listdir(data_dir))


# ---------------------------------------------------------------------------------------------------------
# ---- Karpathy's JSON ----

def read_karpathy_file(data_dir: str, names: list[str]) -> tuple[list, str]:
    if len(names) > 1:  # caption_datasets.zip extracted whole: take the one whose images are here
        present = [name for name in names if _first_image_exists(data_dir, name)]
        if len(present) != 1:
            raise DatasetError(f"{data_dir}: holds {', '.join(names)}, and the images of "
                               f"{'none' if not present else 'more than one'} of them; keep only the one to "
                               f"train on")
        names = present
    path = os.path.join(data_dir, names[0])
    images = _karpathy_images(path)
    records = []
    for i, image in enumerate(images):
        try:
            folder = image["filepath"] if "filepath" in image else None
            captions = [s["raw"] for s in image["sentences"]]
            if not all(isinstance(c, str) for c in captions):
                raise TypeError("'raw': a caption that is not a string")
            records.append({"split": image["split"], "folder": folder, "filename": image["filename"],
                            "id": image.get("cocoid", image.get("imgid", i)), "captions": captions,
                            "listed_in": f"{path}: images[{i}]"})
        except (KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{path}: images[{i}] is malformed (missing or wrong {e})") from None
    if any(r["folder"] is None for r in records):  # Flickr's files: the images beside it, or in one subfolder
        folder = _flickr_image_folder(data_dir, [r["filename"] for r in records if r["folder"] is None], path)
        for record in records:
            record["folder"] = folder if record["folder"] is None else record["folder"]
    splits = sorted({r["split"] for r in records if isinstance(r["split"], str)})
    return records, f"Karpathy's {names[0]}, {len(records)} images, splits {', '.join(splits)}"


def _karpathy_images(path: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f)["images"]
        if not isinstance(images, list):
            raise TypeError("'images' is not a list")
        return images
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise DatasetError(f"{path}: not a Karpathy-format split file ({type(e).__name__}: {e})") from None


def _first_image_exists(data_dir: str, name: str) -> bool:
    try:
        image = _karpathy_images(os.path.join(data_dir, name))[0]
        folder = image.get("filepath", "")
        return os.path.isfile(os.path.join(data_dir, folder, image["filename"])) or \
            os.path.isfile(os.path.join(data_dir, folder + ".zip"))
    except (DatasetError, IndexError, KeyError, TypeError, AttributeError):
        return False


def _flickr_image_folder(data_dir: str, filenames: list[str], path: str) -> str:
    """The folder, relative to data_dir, that holds these images: data_dir itself or one subfolder."""
    probe = [name for name in filenames[:20] if isinstance(name, str)]
    for folder in [""] + sorted(f for f in os.listdir(data_dir) if os.path.isdir(os.path.join(data_dir, f))):
        if probe and all(os.path.isfile(os.path.join(data_dir, folder, name)) for name in probe):
            return folder
    return ""  # none: beside the file, where embedding will list each missing image as unreadable


# ---------------------------------------------------------------------------------------------------------
# ---- Hugging Face's imagefolder ----

def read_imagefolder(data_dir: str, val_share: float, test_share: float) -> tuple[list, str]:
    found = _metadata_files(data_dir)
    root = [path for path in found if os.path.dirname(path) == data_dir]
    in_splits = {path: SPLIT_FOLDERS[os.path.basename(os.path.dirname(path))] for path in found
                 if os.path.dirname(os.path.dirname(path)) == data_dir
                 and os.path.basename(os.path.dirname(path)) in SPLIT_FOLDERS}
    elsewhere = [path for path in found if path not in root and path not in in_splits]
    if elsewhere:
        raise DatasetError(f"{elsewhere[0]}: the imagefolder layout reads metadata only in {data_dir} or in its "
                           f"split folders ({', '.join(f + '/' for f in SPLIT_FOLDERS)}); move it there")
    if len(root) > 1 or len(set(in_splits.values())) < len(in_splits):
        raise DatasetError(f"{', '.join(root or list(in_splits))}: two metadata files for one split; keep one")
    if root and in_splits:
        raise DatasetError(f"{root[0]} and {min(in_splits)}: the layout is either one metadata file in "
                           f"{data_dir} or one per split folder, not both")
    if not found:
        _no_metadata(data_dir)
    if in_splits:
        records = [r for path, split in sorted(in_splits.items()) for r in _metadata_records(path, split)]
        how = f"split folders {', '.join(os.path.basename(os.path.dirname(p)) + '/' for p in sorted(in_splits))}"
    else:
        records = _metadata_records(root[0], None)
        if all(r["split"] is None for r in records):
            _hash_split(records, val_share, test_share)
            how = (f"no split given: by a hash of the file names, val {val_share:.0%} and test {test_share:.0%} "
                   f"(--val-share, --test-share)")
        else:
            how = "a split column"
    sizes = {split: sum(r["split"] == split for r in records) for split in ("train", "val", "test")}
    names = sorted({os.path.basename(path) for path in found})
    return records, (f"imagefolder, {', '.join(names)}, {sum(n > 0 for n in sizes.values())} splits ({how}): "
                     + ", ".join(f"{split} {n} images" for split, n in sizes.items()))


def _metadata_files(data_dir: str) -> list[str]:
    """Every metadata.jsonl / metadata.csv below data_dir, and an error for a misspelt one next to images."""
    found = []
    for folder, subfolders, files in os.walk(data_dir):
        subfolders.sort()
        found += [os.path.join(folder, name) for name in sorted(files) if name in METADATA_FILES]
        near_misses = [name for name in files if name not in METADATA_FILES and
                       (name.lower().startswith(("metadata", "meta.")) or name.lower() in
                        {"captions.jsonl", "captions.csv"}) and not name.endswith((".jpg", ".png"))]
        if near_misses and not any(name in METADATA_FILES for name in files):
            raise DatasetError(f"{os.path.join(folder, near_misses[0])}: not a name the imagefolder layout "
                               f"reads; call it metadata.jsonl (one JSON object per line) or metadata.csv")
    return found


def _no_metadata(data_dir: str):
    listed = sorted(os.listdir(data_dir))[:8]
    raise DatasetError(f"{data_dir}: no dataset here: neither Karpathy's {' / '.join(KARPATHY_FILES)} nor an "
                       f"imagefolder metadata.jsonl / metadata.csv (in the folder or in train/, validation/, "
                       f"test/); it holds {listed}")


def _rows(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.endswith(".csv"):
                rows = list(csv.DictReader(f))
                extra = next((k for k, row in enumerate(rows) if None in row), None)
                if extra is not None:
                    raise DatasetError(f"{path}: row {extra + 1} has more fields than the header (a caption with "
                                       f"a comma needs quotes)")
                return rows
            rows = [json.loads(line) for line in f if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"{path}: not readable as {os.path.basename(path)} ({type(e).__name__}: {e})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise DatasetError(f"{path}: each line must be a JSON object with a file_name")
    return rows


def _metadata_records(path: str, split: str | None) -> list:
    """One record per image of one metadata file (several rows of one image are merged)."""
    rows, folder = _rows(path), os.path.dirname(path)
    if not rows:
        raise DatasetError(f"{path}: lists no images")
    columns = set().union(*rows)
    if "file_name" not in columns:
        raise DatasetError(f"{path}: no file_name column (columns: {sorted(columns)})")
    caption_column = next((c for c in CAPTION_COLUMNS if c in columns), None)
    if caption_column is None and split != "test":  # a test split without references can still be captioned
        raise DatasetError(f"{path}: no caption column: expected one of {', '.join(CAPTION_COLUMNS)} (columns: "
                           f"{sorted(columns)})")
    by_file, missing = {}, []
    for k, row in enumerate(rows):
        name = row.get("file_name")
        where = f"{path}: row {k + 1}"
        if not isinstance(name, str) or not name or os.path.isabs(name) or \
                ".." in name.replace("\\", "/").split("/"):
            raise DatasetError(f"{where}: file_name {name!r} is not a path inside {folder}")
        if not os.path.isfile(os.path.join(folder, name)):
            missing.append(name)
        record_split = SPLIT_NAMES.get(str(row.get("split", "")).lower()) if split is None else split
        if split is None and row.get("split") not in (None, "") and record_split is None:
            raise DatasetError(f"{where}: split {row['split']!r} is not one of {sorted(SPLIT_NAMES)}")
        if name in by_file and by_file[name]["split"] != record_split:
            raise DatasetError(f"{where}: {name!r} is in split {record_split!r} here and "
                               f"{by_file[name]['split']!r} in {by_file[name]['listed_in'].split(': ')[-1]}")
        record = by_file.setdefault(name, {
            "split": record_split, "folder": os.path.relpath(os.path.join(folder, os.path.dirname(name)),
                                                             _dataset_root(path, split)),
            "filename": os.path.basename(name), "id": row.get("id", row.get("image_id", name)), "captions": [],
            "listed_in": where})
        for column in CAPTION_COLUMNS:  # rows may differ in which one they use
            record["captions"] += _captions(row.get(column), where, path.endswith(".csv"))
    unsplit = [r for r in by_file.values() if r["split"] is None]
    if split is None and 0 < len(unsplit) < len(by_file):  # a split column with holes: say so, drop nothing
        raise DatasetError(f"{unsplit[0]['listed_in']}: no split, where other rows have one")
    if missing:
        raise DatasetError(f"{path}: {len(missing)} file_name{'s' if len(missing) > 1 else ''} with no such "
                           f"file in {folder} (first: {missing[0]!r})")
    return list(by_file.values())


def _dataset_root(path: str, split: str | None) -> str:
    folder = os.path.dirname(path)
    return os.path.dirname(folder) if split is not None else folder


def _captions(value, where: str, from_csv: bool) -> list[str]:
    if isinstance(value, str) and value.startswith("[") and from_csv:
        try:  # a CSV cell holding a JSON list
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise DatasetError(f"{where}: captions must be a string or a list of strings, not {value!r}"[:300])


def _hash_split(records: list, val_share: float, test_share: float):
    """Each record's split from a hash of its file name: stable whatever else is in the folder."""
    for record in records:
        name = os.path.join(record["folder"], record["filename"])
        position = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")
        fraction = position / 2 ** 64
        record["split"] = "val" if fraction < val_share else "test" if fraction < val_share + test_share \
            else "train"
