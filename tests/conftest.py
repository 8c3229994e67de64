"""Shared fixtures: tiny models built from configs (nothing is downloaded) and a tiny Karpathy-format dataset."""
import json
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


@pytest.fixture(scope="session")
def small_decoder_dir(tmp_path_factory):
    """A random 1-layer GPT-2 with the real GPT-2 tokenizer, saved like a hub model."""
    from make_small_decoder import make_small_decoder
    return make_small_decoder(str(tmp_path_factory.mktemp("decoder")), layers=1, width=32, heads=2, positions=48)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP vision tower (32 px images, 8 px patches -> a 4 x 4 grid), saved like a hub model."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    path = str(tmp_path_factory.mktemp("clip"))
    CLIPVisionModel(config).save_pretrained(path)
    return path


def write_dataset(root, splits=(("train", 16), ("val", 4), ("test", 4)), seed=0):
    """Karpathy-format folder: one plain-coloured picture per image, captioned with its colour."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    images, cocoid = [], 0
    for split, count in splits:
        for _ in range(count):
            name = list(COLOURS)[cocoid % len(COLOURS)]
            pixels = np.clip(np.array(COLOURS[name]) + rng.integers(-20, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
            filename = f"{cocoid:012d}.jpg"
            Image.fromarray(pixels).save(os.path.join(root, "images", filename))
            sentences = [{"raw": f"A {name} picture."}, {"raw": f"Something {name}, plain and simple."}]
            images.append({"filepath": "images", "filename": filename, "split": split, "cocoid": cocoid,
                           "sentences": sentences})
            cocoid += 1
    with open(os.path.join(root, "dataset_coco.json"), "w") as f:
        json.dump({"images": images, "dataset": "coco"}, f)
    return str(root)


@pytest.fixture
def tiny_dataset(tmp_path):
    return write_dataset(tmp_path / "data")
