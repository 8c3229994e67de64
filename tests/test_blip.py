"""blip:base without LAVIS: a checkpoint in LAVIS's layout loads into transformers' BlipVisionModel through an
explicit key map (strictly checked), and gives the numbers LAVIS's own ViT gives.

The LAVIS comparison needs salesforce-lavis 1.0.2, which cannot share a Python with transformers 5. It runs
LAVIS in a subprocess with the Python named by LAVIS_PYTHON (default: this one, if it imports lavis):
    python3.11 -m venv --system-site-packages /tmp/lavis-env
    /tmp/lavis-env/bin/pip install wheel
    /tmp/lavis-env/bin/pip install --no-build-isolation -r requirements-lavis.txt
    LAVIS_PYTHON=/tmp/lavis-env/bin/python python -m pytest -s tests/test_blip.py  # ours in this Python
    /tmp/lavis-env/bin/python -m pytest -s tests/test_blip.py                      # both in the venv
"""
import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import support.backbones as backbones
from captioner import image_tokens
from support.backbones import (BLIPBackbone, available_backbones, check_backbone_name, load_backbone,
                                load_blip_vision)

TINY = {"image": 32, "patch": 8, "width": 64, "depth": 2, "heads": 2}  # a 4 x 4 patch grid


def random_vit_state(image, patch, width, depth, seed=0, **_):
    """A random state dict with the keys and shapes of timm's / LAVIS's VisionTransformer (mlp_ratio 4, qkv
    bias), written out from that class's definition rather than from our key map."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.02, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=g)

    n, mlp = (image // patch) ** 2, 4 * width
    state = {"cls_token": rand(1, 1, width), "pos_embed": rand(1, n + 1, width),
             "patch_embed.proj.weight": rand(width, 3, patch, patch), "patch_embed.proj.bias": rand(width)}
    for i in range(depth):
        b = f"blocks.{i}."
        # LayerNorms away from the identity and non-zero biases, so that a swapped or dropped key shows
        state |= {b + "norm1.weight": rand(width, scale=0.1, mean=1.0),
                  b + "norm1.bias": rand(width, scale=0.1),
                  b + "attn.qkv.weight": rand(3 * width, width), b + "attn.qkv.bias": rand(3 * width),
                  b + "attn.proj.weight": rand(width, width), b + "attn.proj.bias": rand(width),
                  b + "norm2.weight": rand(width, scale=0.1, mean=1.0),
                  b + "norm2.bias": rand(width, scale=0.1),
                  b + "mlp.fc1.weight": rand(mlp, width), b + "mlp.fc1.bias": rand(mlp),
                  b + "mlp.fc2.weight": rand(width, mlp), b + "mlp.fc2.bias": rand(width)}
    state |= {"norm.weight": rand(width, scale=0.1, mean=1.0), "norm.bias": rand(width, scale=0.1)}
    return state


def reference_forward(state, pixels, heads):
    """LAVIS's VisionTransformer.forward (lavis/models/vit.py) restated in plain torch: pixels (B, 3, H, W) ->
    tokens (B, 1 + h*w, D) after the final LayerNorm (eps 1e-6, exact GELU)."""
    w = state["patch_embed.proj.weight"]
    D, patch = w.shape[0], w.shape[-1]
    x = F.conv2d(pixels, w, state["patch_embed.proj.bias"], stride=patch)  # (B, D, h, w)
    x = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], dim=1) + state["pos_embed"]  # (B, N, D)
    B, N, _ = x.shape

    def ln(x, name):
        return F.layer_norm(x, (D,), state[name + ".weight"], state[name + ".bias"], eps=1e-6)

    def lin(x, name):
        return F.linear(x, state[name + ".weight"], state[name + ".bias"])

    depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    for i in range(depth):
        b = f"blocks.{i}."
        qkv = lin(ln(x, b + "norm1"), b + "attn.qkv").reshape(B, N, 3, heads, D // heads)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, heads, N, D // heads)
        attention = (qkv[0] @ qkv[1].transpose(-2, -1) * (D // heads) ** -0.5).softmax(dim=-1)
        x = x + lin((attention @ qkv[2]).transpose(1, 2).reshape(B, N, D), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return ln(x, "norm")


def write_lavis_checkpoint(path, visual_state, extra_model=None, **extra):
    """Save like BLIP/LAVIS: {"model": {"visual_encoder.*", other towers...}, ...run settings}."""
    model = {f"visual_encoder.{k}": v for k, v in visual_state.items()}
    # the rest of BLIP, which our loader must leave alone; visual_encoder_m is the momentum encoder
    model |= {"visual_encoder_m.cls_token": torch.zeros(1, 1, 4),
              "text_encoder.embeddings.weight": torch.zeros(3, 4),
              "vision_proj.weight": torch.zeros(2, 4), "temp": torch.tensor(0.07)}
    model |= extra_model or {}
    torch.save({"model": model, **extra}, path)
    return str(path)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    state = random_vit_state(**TINY)
    # BLIP's training scripts pickle their settings next to the weights; argparse.Namespace is allowed
    return write_lavis_checkpoint(tmp_path / "model_tiny.pth", state,
                                  config=argparse.Namespace(image_size=32), epoch=3), state


def test_blip_base_is_registered():
    assert "blip:base" in available_backbones()
    assert check_backbone_name("blip:base") == "blip:base"
    assert backbones.BLIP_CHECKPOINTS["blip:base"].endswith("/BLIP/models/model_base_capfilt_large.pth")


def test_key_map_loads_and_matches_the_reference_forward(tiny_checkpoint):
    path, state = tiny_checkpoint
    backbone = BLIPBackbone(checkpoint=path, num_heads=TINY["heads"])
    assert backbone.width == 64 and not backbone.vision.training
    assert not any(p.requires_grad for p in backbone.parameters())
    assert backbone.preprocessing == {"size": 32, "resize": "squash", "mean": backbones.CLIP_MEAN,
                                      "std": backbones.CLIP_STD}
    assert backbone.vision.config.layer_norm_eps == 1e-6
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        global_embedding, grid = backbone.features(pixels)
        expected = reference_forward(state, pixels, TINY["heads"])  # (2, 17, 64)
    assert global_embedding.shape == (2, 64) and grid.shape == (2, 64, 4, 4)
    torch.testing.assert_close(global_embedding, expected[:, 0], atol=1e-5, rtol=0)
    # grid[b, :, r, c] is patch r * 4 + c (row-major, as the patches were flattened)
    torch.testing.assert_close(grid.flatten(2).transpose(1, 2), expected[:, 1:], atol=1e-5, rtol=0)
    assert image_tokens(backbone, pixels, grid=2).shape == (2, 5, 64)


def test_load_backbone_by_name_reads_the_torch_hub_cache(tmp_path, monkeypatch):
    """The URL path without the network: a file already in torch.hub's cache is used, and a missing one is
    fetched into it with torch.hub.download_url_to_file."""
    state = random_vit_state(**TINY)
    source = write_lavis_checkpoint(tmp_path / "source.pth", state)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    fetched = []

    def fake_download(url, destination, progress=True):
        fetched.append((url, destination))
        with open(source, "rb") as f, open(destination, "wb") as out:
            out.write(f.read())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    backbone = load_backbone("blip:base")  # width 64 -> 64 // 64 = 1 head by default
    cached = str(tmp_path / "hub" / "checkpoints" / "model_base_capfilt_large.pth")
    assert fetched == [(backbones.BLIP_CHECKPOINTS["blip:base"], cached)]
    load_backbone("blip:base")
    assert len(fetched) == 1  # the second load found it in the cache
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.features(pixels)[0], reference_forward(state, pixels, 1)[:, 0],
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.pop("visual_encoder.blocks.1.mlp.fc2.bias"),
     r"1 missing keys \(visual_encoder\.blocks\.1\.mlp\.fc2\.bias\), 0 unexpected"),
    (lambda m: m.update({"visual_encoder.head.weight": torch.zeros(10, 64)}),
     r"0 missing keys \(\), 1 unexpected \(visual_encoder\.head\.weight\)"),
    (lambda m: m.update({"visual_encoder.pos_embed": torch.zeros(1, 12, 64)}),  # 11 patches: no square grid
     "inconsistent BLIP ViT weights: .*position_embedding"),
    (lambda m: [m.pop(k) for k in list(m) if k.startswith("visual_encoder.")],
     r"no visual_encoder\.\* weights"),
])
def test_bad_checkpoints_fail_naming_the_file(tmp_path, change, message):
    path = tmp_path / "model_bad.pth"
    checkpoint = {"model": {f"visual_encoder.{k}": v for k, v in random_vit_state(**TINY).items()}}
    change(checkpoint["model"])
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=message) as error:
        load_blip_vision(str(path), num_heads=2)
    assert str(path) in str(error.value)


class _RunsCodeWhenUnpickled:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickled_code_is_refused_and_never_run(tmp_path, capfd):
    path = write_lavis_checkpoint(tmp_path / "model_evil.pth", random_vit_state(**TINY),
                                  config=_RunsCodeWhenUnpickled())
    with pytest.raises(ValueError, match=r"model_evil\.pth: refused to load: .*builtins\.print"):
        load_blip_vision(path, num_heads=2)
    assert "this ran" not in capfd.readouterr().out


def test_a_download_cut_short_is_named_with_what_to_do(tmp_path):
    whole = write_lavis_checkpoint(tmp_path / "whole.pth", random_vit_state(**TINY))
    cut = tmp_path / "model_base_capfilt_large.pth"
    cut.write_bytes(open(whole, "rb").read()[:-1000])  # as an interrupted transfer leaves it
    with pytest.raises(ValueError,
                       match=r"model_base_capfilt_large\.pth: damaged checkpoint .*Delete the file"):
        load_blip_vision(str(cut), num_heads=2)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_blip_vision(str(tmp_path / "nowhere.pth"))


# ---- equality with LAVIS itself ----

LAVIS_SCRIPT = r"""
import json, sys, torch
from PIL import Image
from lavis.models.vit import VisionTransformer, VisionTransformerEncoder
from lavis.processors.blip_processors import BlipImageEvalProcessor

spec, out = json.loads(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
if spec["base"]:  # exactly as LAVIS builds blip_feature_extractor's image encoder ("base", 224 px)
    vit = VisionTransformerEncoder.from_config({"vit_type": "base", "image_size": 224})
else:
    vit = VisionTransformer(img_size=spec["image"], patch_size=spec["patch"], embed_dim=spec["width"],
                            depth=spec["depth"], num_heads=spec["heads"])
vit.eval()
# timm's init leaves biases at 0 and LayerNorms at the identity, which would hide a swapped or dropped key
with torch.no_grad():
    for name, p in vit.named_parameters():
        is_norm = ".norm" in name or name.startswith("norm.")
        mean = 1.0 if is_norm and name.endswith("weight") else 0.0
        p.copy_(mean + (0.1 if is_norm else 0.02) * torch.randn_like(p))
model = {"visual_encoder." + k: v for k, v in vit.state_dict().items()}
model["text_encoder.embeddings.word_embeddings.weight"] = torch.zeros(3, 4)  # the rest of BLIP, to be ignored
torch.save({"model": model}, out + "/checkpoint.pth")
processor = BlipImageEvalProcessor(image_size=spec["image"])
pixels = torch.stack([processor(Image.open(p).convert("RGB")) for p in spec["images"]])
with torch.no_grad():
    embeds = vit.forward_features(pixels) if spec["base"] else vit(pixels)
torch.save({"pixels": pixels, "embeds": embeds}, out + "/lavis.pt")
"""


def lavis_python():
    """The Python that runs LAVIS, or None."""
    if os.environ.get("LAVIS_PYTHON"):
        return os.environ["LAVIS_PYTHON"]
    return sys.executable if importlib.util.find_spec("lavis") else None


def comparison_images(tmp_path):
    """A real photograph when coco-mini is around, and always a generated non-square one (the squash
    resize)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:181, 0:307]
    pixels = np.stack([x * 255 / 306, y * 255 / 180, 128 + 60 * np.sin(x / 9.0 + y / 13.0)], axis=-1)
    pixels = np.clip(pixels + rng.normal(0, 25, pixels.shape), 0, 255).astype(np.uint8)
    generated = str(tmp_path / "generated.png")
    Image.fromarray(pixels).save(generated)
    here = os.path.dirname(os.path.abspath(__file__))
    real = sorted(glob.glob(os.path.join(here, "..", "..", "shared", "coco-mini", "images", "*.jpg")))[:1]
    return [generated] + real


@pytest.mark.parametrize("size", ["tiny", "base"])
def test_equals_lavis(size, tmp_path):
    python = lavis_python()
    if python is None:
        pytest.skip("needs LAVIS: python3.11 -m venv --system-site-packages /tmp/lavis-env && "
                    "/tmp/lavis-env/bin/pip install wheel && /tmp/lavis-env/bin/pip install "
                    "--no-build-isolation -r requirements-lavis.txt && "
                    "LAVIS_PYTHON=/tmp/lavis-env/bin/python python -m pytest -s tests/test_blip.py")
    spec = dict(TINY, base=False) if size == "tiny" else \
        {"image": 224, "patch": 16, "width": 768, "depth": 12, "heads": 12, "base": True}
    spec["images"] = comparison_images(tmp_path)
    run = subprocess.run([python, "-c", LAVIS_SCRIPT, json.dumps(spec), str(tmp_path)], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, f"LAVIS side failed:\n{run.stderr[-3000:]}"
    lavis = torch.load(tmp_path / "lavis.pt", weights_only=True)

    backbone = BLIPBackbone(checkpoint=str(tmp_path / "checkpoint.pth"),
                            num_heads=None if spec["base"] else spec["heads"])  # base: 768 // 64 = 12 heads
    pixels = torch.stack([backbone.preprocess(path) for path in spec["images"]])
    with torch.no_grad():
        global_embedding, grid = backbone.features(pixels)
    side = spec["image"] // spec["patch"]
    embeds = lavis["embeds"]  # (B, 1 + side*side, D)
    lavis_grid = embeds[:, 1:].transpose(1, 2).reshape(len(embeds), -1, side, side)  # (B, D, side, side)
    differences = {"pixels": (pixels - lavis["pixels"]).abs().max().item(),
                   "cls": (global_embedding - embeds[:, 0]).abs().max().item(),
                   "grid": (grid - lavis_grid).abs().max().item()}
    import transformers
    summary = ", ".join(f"{k} {v:.3g}" for k, v in differences.items())
    print(f"\nblip {size} vs LAVIS ({len(pixels)} images, transformers {transformers.__version__} here, "
          f"LAVIS in {python}): max abs difference {summary}")
    assert grid.shape == (len(pixels), spec["width"], side, side)
    assert all(value <= 1e-4 for value in differences.values()), differences
