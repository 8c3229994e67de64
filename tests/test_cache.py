"""The embedding cache: built once, reused, never reused for another backbone, setting or image list."""
import json
import os

import numpy as np
import pytest

import train
from captioner import load_backbone


def no_backbone():
    raise AssertionError("the cache should have been reused, not rebuilt")


def test_cache_is_built_once_then_memory_mapped(tiny_dataset, tiny_clip_dir, tmp_path):
    items = train.read_karpathy(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    loads = []

    def get_backbone():
        loads.append(1)
        return load_backbone(name)

    tokens, meta = train.cached_image_tokens(items, "train", name, 2, str(tmp_path), num_workers=0,
                                             get_backbone=get_backbone)
    assert tokens.shape == (16, 5, 32) and tokens.dtype == np.float16 and loads == [1]
    assert meta["preprocessing"]["size"] == 32
    again, _ = train.cached_image_tokens(items, "train", name, 2, str(tmp_path), get_backbone=no_backbone)
    assert isinstance(again, np.memmap) and np.array_equal(again, tokens)
    # the cached tokens are what the backbone computes for each image, in order
    backbone = load_backbone(name)
    import torch
    direct = backbone.image_tokens(torch.stack([backbone.preprocess(items[3]["path"])]), 2)
    np.testing.assert_allclose(tokens[3].astype(np.float32), direct[0].numpy(), atol=2e-2, rtol=1e-2)
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]  # no leftovers from the atomic write


def test_other_settings_or_images_never_reuse_a_cache(tiny_dataset, tiny_clip_dir, tmp_path):
    items = train.read_karpathy(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    first, _ = train.cached_image_tokens(items, "train", name, 2, str(tmp_path), num_workers=0)
    other_grid, _ = train.cached_image_tokens(items, "train", name, 1, str(tmp_path), num_workers=0)
    assert other_grid.shape == (16, 2, 32)
    fewer, _ = train.cached_image_tokens(items[:-1], "train", name, 2, str(tmp_path), num_workers=0)
    assert fewer.shape == (15, 5, 32)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 3


def test_a_damaged_cache_is_detected_and_rebuilt(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    items = train.read_karpathy(tiny_dataset, "val")
    name = f"clip:{tiny_clip_dir}"
    tokens, _ = train.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)
    expected = np.array(tokens)
    npy_path, meta_path, _ = train.cache_paths(str(tmp_path), "val", name, 2, items)
    with open(npy_path, "r+b") as f:
        f.truncate(100)
    rebuilt, _ = train.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)
    assert "rebuilding" in capsys.readouterr().out
    np.testing.assert_array_equal(np.array(rebuilt), expected)
    with open(meta_path, "w") as f:
        json.dump({"key": "something else"}, f)
    rebuilt, _ = train.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)
    np.testing.assert_array_equal(np.array(rebuilt), expected)


def test_an_unreadable_image_is_named(tiny_dataset, tiny_clip_dir, tmp_path):
    items = train.read_karpathy(tiny_dataset, "val")
    with open(items[2]["path"], "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match=f"{items[2]['filename']}: cannot read this image"):
        train.cached_image_tokens(items, "val", f"clip:{tiny_clip_dir}", 2, str(tmp_path / "cache"), num_workers=0)
    assert not os.listdir(tmp_path / "cache")  # nothing half-written is left to be mistaken for a cache
