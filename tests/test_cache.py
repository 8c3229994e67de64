"""The embedding cache: built once, reused, never reused for another backbone, setting or image list;
unreadable images listed and left out; a stopped build resumed; shares of the rows filled by several
processes."""
import json
from types import SimpleNamespace
import os

import numpy as np
import pytest
import torch

import data
import support.embedding_cache as embedding_cache
import support.images as images
from captioner import image_tokens
from support.processes import embedding_precision
from support.backbones import load_backbone
from conftest import run_train, train_argv


def no_backbone():
    raise AssertionError("the cache should have been reused, not rebuilt")


def test_cache_is_built_once_then_memory_mapped(tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    loads = []

    def get_backbone():
        loads.append(1)
        return load_backbone(name)

    tokens, meta = data.cached_image_tokens(items, "train", name, 2, str(tmp_path), num_workers=0,
                                             get_backbone=get_backbone)
    assert tokens.shape == (16, 5, 32) and tokens.dtype == np.float16 and loads == [1]
    assert meta["preprocessing"]["size"] == 32
    again, _ = data.cached_image_tokens(items, "train", name, 2, str(tmp_path), get_backbone=no_backbone)
    assert isinstance(again, np.memmap) and np.array_equal(again, tokens)
    # the cached tokens are what the backbone computes for each image, in order
    backbone = load_backbone(name)
    import torch
    direct = image_tokens(backbone, torch.stack([backbone.preprocess(items[3].path)]), 2)
    np.testing.assert_allclose(tokens[3].astype(np.float32), direct[0].numpy(), atol=2e-2, rtol=1e-2)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]  # no leftovers from the atomic write


def test_other_settings_or_images_never_reuse_a_cache(tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    first, _ = data.cached_image_tokens(items, "train", name, 2, str(tmp_path), num_workers=0)
    other_grid, _ = data.cached_image_tokens(items, "train", name, 1, str(tmp_path), num_workers=0)
    assert other_grid.shape == (16, 2, 32)
    fewer, _ = data.cached_image_tokens(items[:-1], "train", name, 2, str(tmp_path), num_workers=0)
    assert fewer.shape == (15, 5, 32)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 3


def test_a_damaged_cache_is_detected_and_rebuilt(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    items = data.read_split(tiny_dataset, "val")
    name = f"clip:{tiny_clip_dir}"
    tokens, _ = data.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)
    expected = np.array(tokens)
    cache = embedding_cache.TokenCache.of(items, "val", name, 2, str(tmp_path))
    npy_path, meta_path = cache.path(".npy"), cache.path(".json")
    with open(npy_path, "r+b") as f:
        f.truncate(100)
    rebuilt, _ = data.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)
    assert "rebuilding" in capsys.readouterr().out
    np.testing.assert_array_equal(np.array(rebuilt), expected)
    with open(meta_path, "w") as f:
        json.dump({"key": "something else"}, f)
    rebuilt, _ = data.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)
    np.testing.assert_array_equal(np.array(rebuilt), expected)


def spoil(items):
    """Row 1: a JPEG cut in half; row 2: a text file named .jpg; row 3: a missing file."""
    with open(items[1].path, "rb") as f:
        picture = f.read()
    with open(items[1].path, "wb") as f:
        f.write(picture[: len(picture) // 2])
    with open(items[2].path, "w") as f:
        f.write("not a picture")
    os.remove(items[3].path)


def test_unreadable_images_are_counted_listed_and_left_out(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    items = data.read_split(tiny_dataset, "train")
    spoil(items)
    name = f"clip:{tiny_clip_dir}"
    kept, view, meta = data.split_image_tokens(items, "train", name, 2, str(tmp_path), num_workers=0)
    tokens = np.load(meta["unreadable_file"].replace(".unreadable.json", ".npy"), mmap_mode="r")
    assert meta["unreadable"] == [1, 2, 3]
    assert not tokens[1:4].any() and all(tokens[i].any() for i in range(16) if i not in (1, 2, 3))
    with open(meta["unreadable_file"]) as f:
        listed = json.load(f)
    assert listed == meta["unreadable_images"]
    assert [(r["row"], r["cocoid"], r["path"]) for r in listed] == [(i, i, items[i].path) for i in (1, 2, 3)]
    assert "truncated" in listed[0]["error"].lower() and "cannot identify" in listed[1]["error"]
    assert "No such file" in listed[2]["error"]
    warning = (f"warning: 3 of 16 train images could not be read and are left out. "
               f"The list: {meta['unreadable_file']}")
    assert warning in capsys.readouterr().out
    kept, view, _ = data.split_image_tokens(items, "train", name, 2, str(tmp_path), get_backbone=no_backbone)
    assert warning in capsys.readouterr().out  # reusing the cache says it again: never silent
    again, _ = data.cached_image_tokens(items, "train", name, 2, str(tmp_path), get_backbone=no_backbone)
    assert [item.cocoid for item in kept] == [0] + list(range(4, 16))
    assert view.shape == (13, 5, 32) and len(view) == 13
    np.testing.assert_array_equal(view[[0, 1, 12]], tokens[[0, 4, 15]])  # item positions -> cache rows
    np.testing.assert_array_equal(view[1:3], tokens[4:6])
    readable = again[4:]
    # nothing to drop: no view
    assert embedding_cache.drop_unreadable(items[4:], readable, {"unreadable": []})[1] is readable


def test_a_cache_dir_with_glob_characters_leaves_nothing_behind(tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "train")
    spoil(items)  # unreadable images: each rank lists them in a .jsonl that publishing removes
    folder = tmp_path / "cache [a]*"
    _, meta = data.cached_image_tokens(items, "train", f"clip:{tiny_clip_dir}", 2, str(folder), num_workers=0)
    assert meta["unreadable"] == [1, 2, 3]
    assert not [f for f in os.listdir(folder) if ".partial" in f or ".tmp-" in f], os.listdir(folder)


def test_a_split_without_one_readable_image_is_an_error(tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "val")
    for item in items:
        with open(item.path, "w") as f:
            f.write("not a picture")
    with pytest.raises(ValueError, match=r"none of the 4 val images could be read "
                                         r"\(the list: .*unreadable.json\); the first: .*000000000016.jpg: "):
        data.cached_image_tokens(items, "val", f"clip:{tiny_clip_dir}", 2, str(tmp_path), num_workers=0)


def test_training_leaves_unreadable_images_out(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path,
                                               capsys):
    spoil(data.read_split(tiny_dataset, "train"))
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                         "--max-epochs", "1"))
    out = capsys.readouterr().out
    assert "warning: 3 of 16 train images could not be read" in out
    assert "train 13 images / 26 captions" in out


class Interrupt(Exception):
    pass


def counting(backbone, seen, stop_after_batches=None):
    """Wrap backbone.features: count the images it embeds, and raise after some batches if asked."""
    real = backbone.features

    def features(pixels):
        if stop_after_batches is not None and len(seen) == stop_after_batches:
            raise Interrupt()
        seen.append(len(pixels))
        return real(pixels)

    backbone.features = features
    return backbone


def test_a_stopped_extraction_resumes_where_it_stopped(tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    expected, _ = data.cached_image_tokens(items, "train", name, 2, str(tmp_path / "a"), batch_size=4,
                                           num_workers=0)
    first, second = [], []
    with pytest.raises(Interrupt):  # stopped after two batches of four
        data.cached_image_tokens(
            items, "train", name, 2, str(tmp_path / "b"), batch_size=4, num_workers=0,
            get_backbone=lambda: counting(load_backbone(name), first, stop_after_batches=2))
    assert first == [4, 4]
    partial = [f for f in os.listdir(tmp_path / "b") if ".partial" in f]
    assert len(partial) == 3 and all(f.startswith(os.path.basename(embedding_cache.TokenCache.of(
        items, "train", name, 2, str(tmp_path / "b")).stem)) for f in partial)  # named after the cache key
    tokens, meta = data.cached_image_tokens(
        items, "train", name, 2, str(tmp_path / "b"), batch_size=4, num_workers=2,
        get_backbone=lambda: counting(load_backbone(name), second))
    assert second == [4, 4]  # only the eight images not done before
    np.testing.assert_array_equal(np.array(tokens), np.array(expected))
    assert meta["unreadable"] == []
    assert sorted(os.listdir(tmp_path / "b")) == sorted(os.listdir(tmp_path / "a"))


def test_a_damaged_partial_cache_is_started_over(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    items = data.read_split(tiny_dataset, "val")
    name = f"clip:{tiny_clip_dir}"
    with pytest.raises(Interrupt):
        data.cached_image_tokens(
            items, "val", name, 2, str(tmp_path), batch_size=2, num_workers=0,
            get_backbone=lambda: counting(load_backbone(name), [], stop_after_batches=1))
    cache = embedding_cache.TokenCache.of(items, "val", name, 2, str(tmp_path))
    with open(cache.path(".partial.npy"), "r+b") as f:
        f.truncate(200)
    seen = []
    tokens, _ = data.cached_image_tokens(items, "val", name, 2, str(tmp_path), batch_size=2, num_workers=0,
                                          get_backbone=lambda: counting(load_backbone(name), seen))
    assert "a damaged partial embedding cache" in capsys.readouterr().out and seen == [2, 2]
    assert tokens.shape == (4, 5, 32) and all(tokens[i].any() for i in range(4))


def test_shares_filled_by_two_ranks_equal_one_process(tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    expected, expected_meta = data.cached_image_tokens(items, "train", name, 2, str(tmp_path / "one"),
                                                        batch_size=4, num_workers=0)
    cache = embedding_cache.TokenCache.of(items, "train", name, 2, str(tmp_path / "two"))
    backbone = load_backbone(name)
    embedding_cache.prepare_token_cache(cache, backbone.width)  # rank 0, then a barrier
    encode = data.token_encoder(2, "cpu", "32")
    assert embedding_cache.embed_token_share(cache, items, backbone, encode, batch_size=4, num_workers=0,
                                             rank=1, world_size=2) == 8
    with pytest.raises(RuntimeError, match="8 of 16 images are not embedded yet"):
        embedding_cache.publish_token_cache(cache, items, backbone.preprocessing)
    assert embedding_cache.embed_token_share(cache, items, backbone, encode, batch_size=4, num_workers=0,
                                             rank=0, world_size=2) == 8
    embedding_cache.publish_token_cache(cache, items, backbone.preprocessing)  # rank 0, after a barrier
    tokens, meta = data.cached_image_tokens(items, "train", name, 2, str(tmp_path / "two"),
                                             processes=SimpleNamespace(rank=1, world_size=2, is_main=False,
                                                                       barrier=lambda: None),
                                             get_backbone=no_backbone)
    np.testing.assert_array_equal(np.array(tokens), np.array(expected))
    assert {k: v for k, v in meta.items() if "unreadable_file" != k} == \
        {k: v for k, v in expected_meta.items() if "unreadable_file" != k}


def test_the_precision_is_part_of_the_key_and_cpu_stays_fp32(tiny_dataset):
    items = data.read_split(tiny_dataset, "val")
    assert [embedding_precision(d, p) for d, p in [("cpu", "16"), ("cpu", "bf16"), ("cuda", "16"),
                                                         ("cuda:1", "bf16"), ("cuda", "32")]] == \
        ["32", "32", "16", "bf16", "32"]
    keys = {embedding_cache.TokenCache.of(items, "val", "efficientnet-lite0", 3, "c", precision).key
            for precision in ("32", "16", "bf16")}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="precision must be 32, 16 or bf16, not 'fp16'"):
        embedding_precision("cpu", "fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["16", "bf16"])
def test_mixed_precision_extraction_on_gpu_is_close_to_fp32(precision, tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    fp32, _ = data.cached_image_tokens(items, "train", name, 2, str(tmp_path), num_workers=0)
    mixed, meta = data.cached_image_tokens(items, "train", name, 2, str(tmp_path), device="cuda", num_workers=2,
                                            precision=precision)
    assert meta["precision"] == precision
    np.testing.assert_allclose(np.array(mixed, np.float32), np.array(fp32, np.float32), atol=0.1, rtol=0.05)


def test_a_moved_data_folder_keeps_its_cache(tiny_dataset, tiny_clip_dir, tmp_path):
    import shutil
    name = f"clip:{tiny_clip_dir}"
    tokens, _ = data.cached_image_tokens(data.read_split(tiny_dataset, "val"), "val", name, 2,
                                         str(tmp_path / "c"), num_workers=0)
    moved = shutil.move(tiny_dataset, str(tmp_path / "elsewhere"))
    again, _ = data.cached_image_tokens(data.read_split(moved, "val"), "val", name, 2, str(tmp_path / "c"),
                                        get_backbone=no_backbone)
    np.testing.assert_array_equal(again, tokens)


def test_a_bug_is_not_recorded_as_an_unreadable_image(tiny_dataset, tiny_clip_dir, tmp_path, monkeypatch):
    def broken(image, preprocessing):
        raise TypeError("a programming error")
    monkeypatch.setattr(images, "preprocess_image", broken)
    items = data.read_split(tiny_dataset, "val")
    with pytest.raises(TypeError, match="a programming error"):
        data.cached_image_tokens(items, "val", f"clip:{tiny_clip_dir}", 2, str(tmp_path), num_workers=0)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".unreadable.json")]
