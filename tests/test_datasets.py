"""Your own pictures and captions: every layout train.py reads, built from a few coco-mini photographs and
trained on; each pitfall that other tools ignore silently ends in a message naming the file and the problem;
and captioning a whole folder into a file, resumably."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

import data
from conftest import run_train, train_argv
from karpathy_to_imagefolder import convert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COCO_MINI = os.path.join(REPO, "..", "shared", "coco-mini")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}
SPLITS = {"train": 8, "val": 2, "test": 2}

pytestmark = pytest.mark.skipif(not os.path.isdir(COCO_MINI), reason="needs ../shared/coco-mini")


def photos() -> list[dict]:
    """The first photographs of each coco-mini split, with their captions, in Karpathy's records."""
    with open(os.path.join(COCO_MINI, "dataset_coco.json")) as f:
        images = json.load(f)["images"]
    return [image for split, n in SPLITS.items() for image in [i for i in images if i["split"] == split][:n]]


def copy_photo(image: dict, folder) -> str:
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(COCO_MINI, "images", image["filename"]),  # coco-mini's photos are in images/
                    os.path.join(folder, image["filename"]))
    return image["filename"]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))


def karpathy_coco(root):
    images = photos()
    for image in images:
        copy_photo(image, root / image["filepath"])
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))


def karpathy_flickr(root):  # no filepath, no cocoid: the images in one subfolder, as Flickr30k's are
    images = [{k: v for k, v in image.items() if k not in ("filepath", "cocoid")} for image in photos()]
    for image in images:
        copy_photo(image, root / "flickr30k-images")
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))


def split_folders(root):
    convert(str(karpathy_copy(root / "source")), str(root))
    shutil.rmtree(root / "source")


def karpathy_copy(root):
    karpathy_coco(root)
    return root


def split_column(root):
    rows = [{"file_name": f"pictures/{copy_photo(image, root / 'pictures')}", "split": image["split"],
             "text": image["sentences"][0]["raw"]} for image in photos()]
    write_jsonl(root / "metadata.jsonl", rows)


def no_split(root):
    rows = [{"file_name": copy_photo(image, root), "captions": [s["raw"] for s in image["sentences"]]}
            for image in photos()]
    write_jsonl(root / "metadata.jsonl", rows)


def csv_rows_per_caption(root):
    with open(root / "metadata.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "split"])
        for image in photos():
            for sentence in image["sentences"]:
                writer.writerow([copy_photo(image, root), sentence["raw"], image["split"]])


LAYOUTS = {"karpathy-coco": karpathy_coco, "karpathy-flickr": karpathy_flickr, "split-folders": split_folders,
           "split-column": split_column, "no-split": no_split, "csv-rows-per-caption": csv_rows_per_caption}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_reads_and_trains(layout, small_decoder_dir, tiny_clip_dir, tmp_path, capsys):
    root = tmp_path / "data"
    root.mkdir()
    LAYOUTS[layout](root)
    shares = 0.3, 0.2  # for the layout without splits: 12 images, so that each split has some
    train_items, val_items = (data.read_split(str(root), split, *shares) for split in ("train", "val"))
    said = capsys.readouterr().out
    assert said.count("dataset: ") == 1  # said once, at the first read
    if layout == "no-split":  # a hash of each file name decides
        assert "no split given: by a hash of the file names, val 30% and test 20%" in said
        assert len(train_items) + len(val_items) + len(data.read_split(str(root), "test", *shares)) == 12
    else:
        assert [len(train_items), len(val_items)] == [SPLITS["train"], SPLITS["val"]]
        first = photos()[0]
        captions = [s["raw"].strip() for s in first["sentences"]][:1 if layout == "split-column" else None]
        assert train_items[0].captions == captions and os.path.isfile(train_items[0].path)
    run_train(train_argv(str(root), small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                         "--max-epochs", "1", "--no-download", "--val-share", "0.3", "--test-share", "0.2"))
    assert os.path.isdir(tmp_path / "out" / "model")


def test_the_hash_split_keeps_old_images_where_they_were(tmp_path):
    no_split(tmp_path)
    before = {split: {item.filename for item in data.read_split(str(tmp_path), split, 0.3, 0.3)}
              for split in ("train", "val", "test")}
    assert all(before.values())  # 30% each of 12 images: all three splits have some
    rows = [json.loads(line) for line in open(tmp_path / "metadata.jsonl")]
    extra = [{"file_name": f"new-{k}.jpg", "text": "a new picture"} for k in range(20)]
    for row in extra:
        shutil.copyfile(tmp_path / rows[0]["file_name"], tmp_path / row["file_name"])
    write_jsonl(tmp_path / "metadata.jsonl", rows + extra)
    for split, names in before.items():
        after = {item.filename for item in data.read_split(str(tmp_path), split, 0.3, 0.3)}
        assert names <= after


def test_an_image_listed_twice_is_merged_and_said(tmp_path, capsys):
    no_split(tmp_path)
    rows = [json.loads(line) for line in open(tmp_path / "metadata.jsonl")]
    write_jsonl(tmp_path / "metadata.jsonl", [dict(row, split="train") for row in rows] +
                [{"file_name": rows[0]["file_name"], "text": "another caption", "split": "train"}])
    items = data.read_split(str(tmp_path), "train")
    assert len(items) == 12 and items[0].captions[-1] == "another caption"
    assert len(items[0].captions) == len(rows[0]["captions"]) + 1


def pitfall_metadata_elsewhere(root):
    split_folders(root)
    os.makedirs(root / "train" / "extra")
    shutil.move(str(root / "test" / "metadata.jsonl"), str(root / "train" / "extra" / "metadata.jsonl"))
    return "train/extra/metadata.jsonl: the imagefolder layout reads metadata only in"


def pitfall_misspelt(root):
    no_split(root)
    os.rename(root / "metadata.jsonl", root / "metadata.json")
    return "metadata.json: not a name the imagefolder layout reads; call it metadata.jsonl"


def pitfall_no_caption_column(root):
    no_split(root)
    rows = [json.loads(line) for line in open(root / "metadata.jsonl")]
    write_jsonl(root / "metadata.jsonl", [{"file_name": r["file_name"], "label": "x"} for r in rows])
    return r"metadata.jsonl: no caption column: expected one of text, caption, captions \(columns: \['file_name', "


def pitfall_outside(root):
    no_split(root)
    write_jsonl(root / "metadata.jsonl", [{"file_name": "../escape.jpg", "text": "x"}])
    return "metadata.jsonl: row 1: file_name '../escape.jpg' is not a path inside"


def pitfall_missing_file(root):
    no_split(root)
    rows = [json.loads(line) for line in open(root / "metadata.jsonl")]
    write_jsonl(root / "metadata.jsonl", rows + [{"file_name": "gone.jpg", "text": "x"}])
    return "metadata.jsonl: 1 file_name with no such file in"


def pitfall_empty_split(root):
    split_folders(root)
    write_jsonl(root / "validation" / "metadata.jsonl", [])
    return "validation/metadata.jsonl: lists no images"


def pitfall_both_layouts(root):
    split_folders(root)
    shutil.copyfile(root / "train" / "metadata.jsonl", root / "metadata.jsonl")
    return "metadata.jsonl and .*metadata.jsonl: the layout is either one metadata file in"


def pitfall_unquoted_comma(root):
    csv_rows_per_caption(root)
    with open(root / "metadata.csv", "a") as f:
        f.write(f"{os.listdir(root)[0]},a dog, running,train\n")
    return r"metadata.csv: row \d+ has more fields than the header \(a caption with a comma needs quotes\)"


def pitfall_split_column_with_holes(root):
    split_column(root)
    rows = [json.loads(line) for line in open(root / "metadata.jsonl")]
    rows[3].pop("split")
    write_jsonl(root / "metadata.jsonl", rows)
    return "metadata.jsonl: row 4: no split, where other rows have one"


def pitfall_one_image_in_two_splits(root):
    split_column(root)
    rows = [json.loads(line) for line in open(root / "metadata.jsonl")]
    write_jsonl(root / "metadata.jsonl", rows + [dict(rows[0], split="test")])
    return "metadata.jsonl: row 13: 'pictures/.*' is in split 'test' here and 'train' in row 1"


def pitfall_caption_not_a_string(root):
    karpathy_coco(root)
    dataset = json.loads((root / "dataset_coco.json").read_text())
    dataset["images"][2]["sentences"][0]["raw"] = None
    (root / "dataset_coco.json").write_text(json.dumps(dataset))
    return r"dataset_coco.json: images\[2\] is malformed \(missing or wrong 'raw': a caption that is not a string"


PITFALLS = [pitfall_metadata_elsewhere, pitfall_misspelt, pitfall_no_caption_column, pitfall_outside,
            pitfall_missing_file, pitfall_empty_split, pitfall_both_layouts, pitfall_unquoted_comma,
            pitfall_split_column_with_holes, pitfall_one_image_in_two_splits, pitfall_caption_not_a_string]


@pytest.mark.parametrize("make", PITFALLS, ids=[p.__name__[8:] for p in PITFALLS])
def test_each_pitfall_names_the_file_and_the_problem(make, tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    expected = make(root)
    with pytest.raises(ValueError, match=expected) as error:
        data.read_split(str(root), "train")
    assert str(root) in str(error.value)


def test_a_split_without_references_is_captioned_but_not_scored(small_decoder_dir, tiny_clip_dir, tmp_path):
    root = tmp_path / "data"
    split_folders(root)
    rows = [json.loads(line) for line in open(root / "test" / "metadata.jsonl")]
    write_jsonl(root / "test" / "metadata.jsonl", [{"file_name": r["file_name"]} for r in rows])
    assert [item.captions for item in data.read_split(str(root), "test", need_captions=False)] == [[], []]
    run_train(train_argv(str(root), small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                         "--max-epochs", "1"))
    result = subprocess.run([sys.executable, os.path.join(REPO, "evaluate.py"), "--checkpoint",
                             str(tmp_path / "out" / "model"), "--data-dir", str(root), "--split", "test",
                             "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "the test split has no captions to score against; caption its images with" in result.stderr


def test_a_converted_coco_mini_reads_as_the_original(tmp_path):
    convert(COCO_MINI, str(tmp_path / "folder"))
    for split in ("train", "val", "test"):
        original = data.read_split(COCO_MINI, split)
        converted = data.read_split(str(tmp_path / "folder"), split)
        assert [(i.cocoid, i.filename, i.captions) for i in original] == \
            [(i.cocoid, i.filename, i.captions) for i in converted]


# ---- captioning a folder ----

@pytest.fixture(scope="module")
def model_path(tmp_path_factory, small_decoder_dir, tiny_clip_dir):
    from conftest import write_dataset
    folder = tmp_path_factory.mktemp("model")
    run_train(train_argv(write_dataset(folder / "data"), small_decoder_dir, tiny_clip_dir, folder / "out",
                         folder / "cache", "--max-epochs", "1"))
    return str(folder / "out" / "model")


def photo_folder(root) -> list[str]:
    """coco-mini photos in nested folders, with files that are not images and a damaged JPEG among them."""
    names = []
    for k, image in enumerate(photos()):
        names.append(os.path.join(f"album-{k % 3}", "sub" if k % 2 else "", copy_photo(
            image, root / f"album-{k % 3}" / ("sub" if k % 2 else ""))))
    (root / "notes.txt").write_text("not a picture")
    (root / "album-0" / "photo.jpg.json").write_text("{}")
    data_bytes = open(root / names[0], "rb").read()
    (root / "album-1" / "cut.jpg").write_bytes(data_bytes[:len(data_bytes) // 3])
    shutil.copyfile(root / names[1], root / "album-2" / "no-extension")  # an image by content, not by name
    return names


def caption_command(model_path, *argv):
    return [sys.executable, os.path.join(REPO, "captioner.py"), "--checkpoint", model_path, "--device", "cpu",
            "--num-workers", "0", "--batch-size", "4", *map(str, argv)]


def read_rows(path) -> list[dict]:
    if str(path).endswith(".csv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    return [json.loads(line) for line in open(path)]


@pytest.mark.parametrize("suffix", ["jsonl", "csv"])
def test_a_folder_is_captioned_into_a_file_and_non_images_are_listed(model_path, tmp_path, suffix):
    names = photo_folder(tmp_path / "photos")
    output = tmp_path / f"captions.{suffix}"
    result = subprocess.run(caption_command(model_path, tmp_path / "photos", "--output", output),
                            capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    rows = read_rows(output)
    by_file = {os.path.relpath(row["file"], tmp_path / "photos"): row for row in rows}
    assert len(rows) == len(by_file) == len(names) + 4
    assert all(by_file[name]["caption"] for name in names) and by_file["album-2/no-extension"]["caption"]
    assert {name for name, row in by_file.items() if row.get("error")} == \
        {"notes.txt", "album-0/photo.jpg.json", "album-1/cut.jpg"}
    assert f"{len(names) + 1} images captioned, 0 done before; 3 files are not readable images" in result.stderr


def test_a_killed_folder_run_resumes_and_writes_each_image_once(model_path, tmp_path):
    names = photo_folder(tmp_path / "photos")
    output = tmp_path / "captions.jsonl"
    # the child kills itself while captioning its third batch of four, after two batches were written
    patch = ("import os, signal, sys, runpy\nimport support.caption_files as c\n"
             "real, calls = c.CaptionsFile.write, []\n"
             "def write(self, rows):\n    calls.append(1)\n    if len(calls) == 3:\n"
             "        self.file.write('{\"file\": \"torn')\n        self.file.flush()\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n    real(self, rows)\n"
             "c.CaptionsFile.write = write\n"
             f"sys.argv = {caption_command(model_path, tmp_path / 'photos', '--output', output)[1:]!r}\n"
             f"runpy.run_path({os.path.join(REPO, 'captioner.py')!r}, run_name='__main__')\n")
    killed = subprocess.run([sys.executable, "-c", patch], capture_output=True, text=True, env=ENV, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert len(open(output).read().splitlines()) == 9  # two batches, then a torn line
    again = subprocess.run(caption_command(model_path, tmp_path / "photos", "--output", output),
                           capture_output=True, text=True, env=ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "8 of 16 files were done before" in again.stderr
    rows = read_rows(output)
    assert len(rows) == len({row["file"] for row in rows}) == len(names) + 4


def test_a_folder_with_its_own_data_never_receives_coco_downloads(tmp_path, monkeypatch):
    import support.coco_download
    from support.processes import Processes
    monkeypatch.setattr(support.coco_download, "download_file", lambda *a, **k: pytest.fail("a download"))
    no_split(tmp_path)
    os.rename(tmp_path / "metadata.jsonl", tmp_path / "metadata.json")  # misspelt: not a dataset yet
    with pytest.raises(ValueError, match="metadata.json: not a name the imagefolder layout reads"):
        data.training_splits(str(tmp_path), "efficientnet-lite0", 1, str(tmp_path / "cache"), "32", 0,
                             Processes(), download=True)
    assert data.is_coco_folder(str(tmp_path / "absent")) and not data.is_coco_folder(str(tmp_path))


def test_the_output_is_never_damaged_nor_shared(model_path, tmp_path):
    names = photo_folder(tmp_path / "photos")
    precious = tmp_path / "results.jsonl"
    precious.write_text('{"accuracy": 0.9}\nnot json, no newline')
    refused = subprocess.run(caption_command(model_path, tmp_path / "photos", "--output", precious),
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert refused.returncode == 1 and "not a captions file this program wrote" in refused.stderr
    assert precious.read_text() == '{"accuracy": 0.9}\nnot json, no newline'  # not a byte changed
    from support.files import file_lock
    output = tmp_path / "photos" / "captions.jsonl"  # inside the folder it captions: never its own input
    with file_lock(str(output) + ".lock", "another run"):
        busy = subprocess.run(caption_command(model_path, tmp_path / "photos", "--output", output),
                              capture_output=True, text=True, env=ENV, timeout=300)
    assert busy.returncode == 1 and "is in use by" in busy.stderr and "Traceback" not in busy.stderr
    done = subprocess.run(caption_command(model_path, tmp_path / "photos", "--output", output),
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(read_rows(output)) == len(names) + 4
