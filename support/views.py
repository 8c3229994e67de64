"""Augmented views of the training images, for train.py --augment-views N: each training image is also
embedded in N fixed views, cached beside the plain one, and every caption is paired with one view drawn
afresh each epoch. The backbone is frozen and its tokens cached, so augmentation has to happen at embedding
time; a fixed set of views is what makes them cacheable. The set is AlexNet's ten crops (Krizhevsky et al.
2012: the four corners and the centre, each also mirrored) plus the mirrored whole image, cut from the
backbone's preprocessed square and resized back to it.

A mirrored view would contradict a caption that says "left" or "right", so the views of an image whose
captions use either word are drawn from the unmirrored ones only. tokens_to_device puts the splits' image
tokens, views included, in device memory (train.py --tokens-on-device).
"""

import re

import numpy as np
import torch
import torch.nn.functional as F

from support.embedding_cache import drop_unreadable
from support.run import seeded_generator

CROP = 0.875  # AlexNet's 224 of 256: each crop keeps 87.5% of the side
# In the order --augment-views N takes them: the mirrored image first, then crops that differ most.
VIEWS = ("mirrored", "top-left", "bottom-right", "top-right", "bottom-left", "centre", "top-left mirrored",
         "bottom-right mirrored", "top-right mirrored", "bottom-left mirrored", "centre mirrored")
SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def view_pixels(view: str, pixels: torch.Tensor) -> torch.Tensor:
    """pixels (B, 3, S, S), as the backbone's preprocessing makes them -> the view, (B, 3, S, S)."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; the views: {', '.join(VIEWS)}")
    crop = view.replace("mirrored", "").strip()  # "top-left", "centre", or "" for the whole image
    if crop:
        size = pixels.shape[-1]
        side = round(size * CROP)
        top = {"top": 0, "bottom": size - side, "centre": (size - side) // 2}[crop.split("-")[0]]
        left = {"left": 0, "right": size - side, "centre": (size - side) // 2}[crop.split("-")[-1]]
        pixels = pixels[..., top:top + side, left:left + side]  # (B, 3, side, side)
        pixels = F.interpolate(pixels.float(), size=(size, size), mode="bilinear", align_corners=False,
                               antialias=False).to(pixels.dtype)  # back to (B, 3, S, S)
    return pixels.flip(-1) if view.endswith("mirrored") else pixels


def mirrorable(captions: list[str]) -> bool:
    """Whether mirroring the image leaves its captions true: none says "left" or "right"."""
    return not any(SIDES.search(caption) for caption in captions)


def draw_views(captions: list[list], mirror_ok: list[bool], views: int, epoch: int, seed: int) -> list[list[int]]:
    """-> view[i][j] for caption j of image i: 0 = the plain image, k = VIEWS[k - 1], drawn uniformly from the
    plain image and its first `views` views (without the mirrored ones where mirror_ok[i] is False). A pure
    function of (seed, epoch), so a resumed run draws the same."""
    allowed_all = list(range(views + 1))
    allowed_unmirrored = [0] + [k + 1 for k, name in enumerate(VIEWS[:views]) if "mirrored" not in name]
    generator = seeded_generator("views", seed, epoch)
    draws = torch.rand(sum(len(c) for c in captions), generator=generator, dtype=torch.float64).tolist()
    out, k = [], 0
    for caps, ok in zip(captions, mirror_ok):
        allowed = allowed_all if ok else allowed_unmirrored
        out.append([allowed[min(int(u * len(allowed)), len(allowed) - 1)] for u in draws[k:k + len(caps)]])
        k += len(caps)
    return out


def view_tokens(cached, items, plain_meta):
    """The tokens of an augmented view, cached (tokens, meta) for every item, without the rows that the plain
    view left out, so that row i belongs to the same image in both."""
    tokens, meta = cached
    if meta["unreadable"] != plain_meta["unreadable"]:
        raise ValueError(f"{meta['unreadable_file']}: the {meta.get('split')} images unreadable in this view "
                         f"differ from the plain view's; delete both caches' files to embed them again")
    return drop_unreadable(items, tokens, meta)[1]


def tokens_to_device(splits, device):
    """The splits' image tokens to the device; the train split's views as one (views + 1, N, K, D) tensor."""
    for split in splits.values():
        split["tokens"] = torch.from_numpy(np.ascontiguousarray(split["tokens"][:])).to(device)
    splits["train"]["all_views"] = torch.stack([torch.from_numpy(np.ascontiguousarray(t[:]))
                                                for t in splits["train"]["all_views"]]).to(device)
