"""
Convert a Karpathy-format dataset (dataset_coco.json and its images) to Hugging Face's imagefolder layout:
train/, validation/ and test/ folders, each with its images and a metadata.jsonl of {"file_name", "captions",
"id"} rows in the JSON's order (restval goes to train, as train.py reads it). The images are hard links where
the file system allows, else copies.

    python tools/karpathy_to_imagefolder.py ../shared/coco-mini runs/coco-mini-imagefolder

Training on the result gives the same captions in the same order, hence the same batches, as on the
original (tools/coco_mini_run.sh compares the two).
"""

import argparse
import json
import os
import shutil

FOLDERS = {"train": "train", "restval": "train", "val": "validation", "test": "test"}


def convert(source: str, target: str) -> dict:
    """-> images written per folder."""
    with open(os.path.join(source, "dataset_coco.json"), encoding="utf-8") as f:
        images = json.load(f)["images"]
    rows = {folder: [] for folder in dict.fromkeys(FOLDERS.values())}
    for image in images:
        folder = FOLDERS[image["split"]]
        os.makedirs(os.path.join(target, folder), exist_ok=True)
        origin = os.path.join(source, image.get("filepath", ""), image["filename"])
        copy = os.path.join(target, folder, image["filename"])
        if not os.path.exists(copy):
            try:
                os.link(origin, copy)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(origin, copy)
        rows[folder].append({"file_name": image["filename"], "captions": [s["raw"] for s in image["sentences"]],
                             "id": image.get("cocoid", image.get("imgid"))})
    for folder, folder_rows in rows.items():
        if folder_rows:
            with open(os.path.join(target, folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
                f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in folder_rows))
    return {folder: len(folder_rows) for folder, folder_rows in rows.items()}


def main():
    parser = argparse.ArgumentParser("Karpathy-format dataset -> imagefolder layout")
    parser.add_argument("source", help="folder with dataset_coco.json and its images")
    parser.add_argument("target", help="the imagefolder to write (created)")
    args = parser.parse_args()
    counts = convert(args.source, args.target)
    print(f"{args.target}: " + ", ".join(f"{folder}/ {n} images" for folder, n in counts.items()))


if __name__ == "__main__":
    main()
