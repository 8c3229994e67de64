"""Shared fixtures: tiny models built from configs (nothing is downloaded) and a tiny Karpathy-format
dataset."""
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
    return make_small_decoder(str(tmp_path_factory.mktemp("decoder")), layers=1, width=32, heads=2,
                              positions=48)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A random CLIP vision tower (32 px images, 8 px patches -> a 4 x 4 grid), saved like a hub model."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8, projection_dim=16)
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
            noise = rng.integers(-20, 20, (40, 48, 3))
            pixels = np.clip(np.array(COLOURS[name]) + noise, 0, 255).astype(np.uint8)
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


# ---- helpers shared by several test files ----

def run_train(argv):
    import train
    parser = train.get_args_parser()
    args = parser.parse_args(argv)
    train.check_args(args, parser)
    train.main(args)


def train_argv(data, decoder, clip, out, cache, *extra):
    return ["--data-dir", data, "--vision-backbone", f"clip:{clip}", "--language-model", decoder,
            "--image-grid", "2", "--out-dir", str(out), "--cache-dir", str(cache), "--batch-size", "4",
            "--accumulate-grad-batches", "3", "--max-epochs", "2", "--lr", "1e-3", "--precision", "32",
            "--device", "cpu", "--log-interval", "1", "--num-workers", "0", "--max-length", "8",
            "--checkpoint-every", "0", *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


VOCAB, EOS = 5, 4  # the tiny model's vocabulary: tokens 0-3 are words, 4 ends a caption


def tiny_model(seed=0, vocab=VOCAB, eos=EOS, grid=1, width=6):
    """A random 2-layer caption model over a 5-token vocabulary, in eval mode."""
    import torch
    from transformers import GPT2Config
    from captioner import CaptionModel, CaptionerConfig
    torch.manual_seed(seed)
    decoder = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                         add_cross_attention=True, bos_token_id=eos, eos_token_id=eos)
    config = CaptionerConfig(vision_backbone="test", image_grid=grid, image_width=width,
                             decoder=decoder.to_dict(), eos_token_id=eos)
    model = CaptionModel(config).eval()
    with torch.no_grad():  # sharpen the output so that sequences differ clearly in probability
        model.decoder.lm_head.weight.mul_(4.0)
        model.image_slot_embedding.normal_()
    return model


def image_tokens(model, batch, seed=1):
    import torch
    torch.manual_seed(seed)
    return torch.randn(batch, model.config.num_image_tokens, model.config.image_width)
