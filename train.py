"""
Train a caption decoder on frozen image embeddings.

    python train.py --data-dir data/coco --vision-backbone clip:ViT-B/32   # the original's other defaults
    python train.py --data-dir ../shared/coco-mini --vision-backbone efficientnet-lite0 \
        --language-model runs/small-decoder --lr 1e-3        # offline, on a CPU (see tools/)

Reads a Karpathy-format dataset, computes the backbone's image tokens once per split (cached on disk in
fp16, memory-mapped), then runs a hand-rolled loop: autocast (fp16 + GradScaler, bf16 or fp32), gradient
accumulation whose gradient equals the one big batch, AdamW with warmup + cosine, clipping. After every epoch
it measures validation loss and BLEU-4 (real decoding) and keeps the best epoch in OUT/model.pt; the full
training state goes to OUT/checkpoint.pt so that --resume continues exactly where the run stopped.

Several GPUs: `torchrun --nproc_per_node=N train.py ...` runs DistributedDataParallel; every optimizer step
then sees batch size x accumulation x N captions, and rank 0 alone logs, evaluates and writes files.
"""

import argparse
import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from captioner import (ArchiveError, CaptionModel, CaptionerConfig, atomic_torch_save, atomic_write,
                       build_model, check_backbone_name, default_device, load_backbone, preprocess_image,
                       safe_torch_load, save_model, tokenizer_from_data, tokenizer_to_data)

CHECKPOINT_FORMAT = "captioner-checkpoint"
CHECKPOINT_VERSION = 1
CACHE_VERSION = 1

# ---------------------------------------------------------------------------------------------------------
# ---- dataset ----

def read_karpathy(data_dir: str, split: str) -> list[dict]:
    """Images of one split of a Karpathy-format `dataset_coco.json`: [{cocoid, filename, path, captions}].
    `train` also takes `restval` (the 30k val2014 images Karpathy added to training)."""
    path = os.path.join(data_dir, "dataset_coco.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; --data-dir must hold a Karpathy-format "
                                f"dataset_coco.json and the images it names")
    try:
        with open(path, encoding="utf-8") as f:
            images = json.load(f)["images"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a Karpathy-format split file ({type(e).__name__}: {e})") from None
    wanted = ("train", "restval") if split == "train" else (split,)
    items = []
    for i, image in enumerate(images):
        try:
            if image["split"] not in wanted:
                continue
            captions = [s["raw"].strip() for s in image["sentences"]]
            items.append({"cocoid": image.get("cocoid", image.get("imgid", i)), "filename": image["filename"],
                          "path": os.path.join(data_dir, image.get("filepath", ""), image["filename"]),
                          "captions": captions})
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: images[{i}] is malformed (missing or wrong {e})") from None
    if not items:
        present = sorted({image.get("split") for image in images if isinstance(image, dict)})
        raise ValueError(f"{path}: split {split!r} has no images (splits present: {present})")
    return items


# ---------------------------------------------------------------------------------------------------------
# ---- embedding cache ----
# The frozen backbone's image tokens for a split, (N, K, D) float16, computed once and memory-mapped.
# The file name carries a hash of everything that determines its content (backbone, grid, image list), so a
# cache made for anything else is never picked up; a damaged file is detected and rebuilt.

def _backbone_fingerprint(backbone_name: str):
    """A local backbone directory can change under the same name: fold its files' sizes and times in."""
    folder = backbone_name[len("clip:"):] if backbone_name.startswith("clip:") else ""
    if not os.path.isdir(folder):
        return backbone_name
    files = sorted((f, os.path.getsize(os.path.join(folder, f)), os.path.getmtime(os.path.join(folder, f)))
                   for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    return [os.path.abspath(folder), files]


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1  # missing: embedding will name the file


def cache_paths(cache_dir: str, split: str, backbone_name: str, grid: int, items: list[dict]):
    # Which files, where, and how big: a second copy of a dataset with other (say, resized) images gets its own
    # cache. Sizes rather than times, so that copying a dataset keeps its cache valid.
    identity = {"version": CACHE_VERSION, "backbone": _backbone_fingerprint(backbone_name), "grid": grid,
                "images": [[item["cocoid"], os.path.abspath(item["path"]), _file_size(item["path"])] for item in items]}
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in backbone_name.split("/")[-1])
    stem = os.path.join(cache_dir, f"{split}-{slug}-grid{grid}-{key}")
    return stem + ".npy", stem + ".json", key


class ImageFiles(torch.utils.data.Dataset):
    def __init__(self, paths, preprocessing):
        self.paths, self.preprocessing = paths, preprocessing

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return preprocess_image(self.paths[i], self.preprocessing)


def _one_thread(_worker_id):
    # Workers only decode and resize JPEGs; left at the default they would each start as many math threads
    # as there are cores and fight the backbone for them.
    torch.set_num_threads(1)


def cached_image_tokens(items, split, backbone_name, grid, cache_dir, device="cpu", batch_size=32,
                        num_workers=2, get_backbone=None):
    """-> (a read-only memmap (N, K, D) float16 of the split's image tokens, its description dict),
    built on first use. The backbone (`get_backbone()`, default: load it by name) is only loaded then."""
    npy_path, meta_path, key = cache_paths(cache_dir, split, backbone_name, grid, items)
    K = 1 + grid * grid
    if os.path.isfile(npy_path) and os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            tokens = np.load(npy_path, mmap_mode="r")
            if meta.get("key") == key and tokens.dtype == np.float16 and list(tokens.shape) == meta.get("shape") \
                    and tokens.shape[:2] == (len(items), K):
                return tokens, meta
            print(f"embedding cache {npy_path} does not match its description; rebuilding it")
        except (OSError, ValueError, json.JSONDecodeError) as e:
            print(f"embedding cache {npy_path} is unreadable ({e}); rebuilding it")

    os.makedirs(cache_dir, exist_ok=True)
    backbone = (get_backbone() if get_backbone else load_backbone(backbone_name)).to(device).eval()
    loader = torch.utils.data.DataLoader(ImageFiles([item["path"] for item in items], backbone.preprocessing),
                                         batch_size=batch_size, num_workers=num_workers, shuffle=False,
                                         worker_init_fn=_one_thread)
    tmp_path = npy_path + f".tmp-{os.getpid()}.npy"
    output = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float16, shape=(len(items), K, backbone.width))
    start_time, done = time.time(), 0
    try:
        for pixels in tqdm(loader, desc=f"embedding {split} images with {backbone_name}", unit="batch"):
            tokens = backbone.image_tokens(pixels.to(device), grid)  # (b, K, D)
            output[done:done + len(tokens)] = tokens.float().cpu().numpy().astype(np.float16)
            done += len(tokens)
        output.flush()
        del output
        os.replace(tmp_path, npy_path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    meta = {"key": key, "split": split, "backbone": backbone_name, "grid": grid, "images": len(items),
            "shape": [len(items), K, backbone.width], "preprocessing": backbone.preprocessing}
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    print(f"embedded {len(items)} {split} images in {time.time() - start_time:.0f}s "
          f"({len(items) / (time.time() - start_time):.1f} images/s) -> {npy_path}")
    return np.load(npy_path, mmap_mode="r"), meta


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "captioner", "embeddings")


def atomic_write_text(path: str, text: str):
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


# ---------------------------------------------------------------------------------------------------------
# ---- batches ----

def tokenize_captions(tokenizer, items, max_tokens: int) -> list[list[list[int]]]:
    """-> per image, per caption: token ids ending with EOS, at most max_tokens long (EOS included)."""
    texts = [caption for item in items for caption in item["captions"]]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    eos = tokenizer.eos_token_id
    return [[next(encoded)[: max_tokens - 1] + [eos] for _ in item["captions"]] for item in items]


def epoch_order(captions, epoch: int, seed: int, one_caption_per_image: bool) -> list[tuple[int, int]]:
    """(image, caption) pairs of one epoch, shuffled by a generator seeded from (seed, epoch) alone, so the
    order can be recomputed on resume. The original trained one random caption per image per epoch; we
    use every caption by default."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if one_caption_per_image:
        picks = [int(torch.randint(len(c), (1,), generator=generator)) for c in captions]
        pairs = list(enumerate(picks))
    else:
        pairs = [(i, j) for i, c in enumerate(captions) for j in range(len(c))]
    return [pairs[k] for k in torch.randperm(len(pairs), generator=generator).tolist()]


def make_batch(pairs, captions, image_tokens, eos: int, train_padding: bool = False):
    """-> image tokens (B, K, D) float16, input_ids (B, T), labels (B, T) with -100 on padding.
    Each sequence is EOS + caption + EOS; inputs drop the last token, labels drop the first."""
    sequences = [[eos] + captions[i][j] for i, j in pairs]
    T = max(len(s) for s in sequences) - 1
    input_ids = torch.full((len(pairs), T), eos, dtype=torch.long)
    # The original trained padding as EOS; we never put padding in the loss (train_padding recreates it).
    labels = torch.full((len(pairs), T), eos if train_padding else -100, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s) - 1] = torch.tensor(s[:-1])
        labels[row, : len(s) - 1] = torch.tensor(s[1:])
    index = [i for i, _ in pairs]
    tokens = torch.from_numpy(np.ascontiguousarray(image_tokens[index]))  # (B, K, D) fp16
    return tokens, input_ids, labels


# ---------------------------------------------------------------------------------------------------------
# ---- optimisation ----

def get_lr(step: int, total_steps: int, args) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine down to lr * min_lr_ratio."""
    if args.lr_schedule == "constant":
        return args.lr
    warmup = max(1, round(args.warmup_fraction * total_steps))
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    min_lr = args.lr * args.min_lr_ratio
    return min_lr + 0.5 * (args.lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float, weight_decay: float):
    # Decay matrices only; biases, LayerNorms and the image-slot embedding are not decayed (as in nanoGPT).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "slot" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "slot" in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999))


def labelled_positions(labels):
    """labels (B, T) -> flat indices (N,) of the positions with a label, and those labels (N,)."""
    positions = (labels.flatten() != -100).nonzero().squeeze(1)
    return positions, labels.flatten()[positions]


def sequence_loss_sum(logits, labels):
    """logits (N, V), labels (N,) -> summed (not averaged) token cross-entropy, in fp32."""
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def accumulate_gradients(model, batches, scaler, args, weight: float = 1.0):
    """Forward and backward over this process's micro-batches of one optimizer step -> (mean token loss of
    the whole window, over all processes, as a tensor; caption tokens in the window).
    Each micro-batch's summed token loss is divided by the caption tokens of the whole window, so the
    accumulated gradient equals that of the one big batch's mean token loss, however the tokens are split
    across micro-batches and processes (a plain mean per micro-batch would over-weight short ones).
    weight=0 runs a batch for its shape only: a process with no captions left in the last window must still
    join the gradient all-reduce."""
    window_tokens = sum(int((labels != -100).sum()) for _, _, labels in batches) * int(weight != 0)
    window_loss = torch.zeros((), device=args.device)
    if args.world_size > 1:
        counts = torch.tensor([float(window_tokens)], device=args.device)
        dist.all_reduce(counts)  # SUM over processes
        window_tokens = int(counts.item())
    # DDP averages gradients over processes; multiplying by the world size turns that average into the sum.
    scale = weight * args.world_size / window_tokens
    for k, (image_tokens, input_ids, labels) in enumerate(batches):
        positions, targets = labelled_positions(labels)  # on the CPU, where no synchronisation is needed
        image_tokens, input_ids = image_tokens.to(args.device, non_blocking=True), input_ids.to(args.device, non_blocking=True)
        positions, targets = positions.to(args.device, non_blocking=True), targets.to(args.device, non_blocking=True)
        # DDP all-reduces gradients during backward; once per optimizer step is enough: the last micro-batch
        last = k == len(batches) - 1
        with model.no_sync() if args.world_size > 1 and not last else contextlib.nullcontext():
            with autocast_context(args):
                logits = model(image_tokens, input_ids, positions)  # (N, V), N = caption tokens
            loss = sequence_loss_sum(logits, targets) * scale
            scaler.scale(loss).backward()
        window_loss += loss.detach()
    if args.world_size > 1:
        dist.all_reduce(window_loss)  # every process sees the same loss, so all stop together if it is bad
    return window_loss / args.world_size, window_tokens


def train_one_epoch(model, optimizer, scaler, data, epoch, state, total_steps, args, log):
    """Run the optimizer steps of one epoch from state['step_in_epoch'] on. Returns False if the run must
    stop early (--stop-after-steps), True when the epoch is complete."""
    model.train()
    pairs = epoch_order(data["captions"], epoch, args.seed, args.one_caption_per_image)
    # A window is one optimizer step: batch size x accumulation x world size captions; the last, shorter
    # window is kept, not dropped. Process r takes every world_size-th caption of it, in micro-batches.
    window_size = args.batch_size * args.accumulate_grad_batches * args.world_size
    windows = [pairs[i:i + window_size] for i in range(0, len(pairs), window_size)]
    interval = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.time()}
    for window_index in range(state["step_in_epoch"], len(windows)):
        lr = get_lr(state["step"], total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = windows[window_index][args.rank::args.world_size]
        weight = 1.0 if mine else 0.0
        mine = mine or windows[window_index][:1]
        batches = [make_batch(mine[i:i + args.batch_size], data["captions"], data["tokens"], data["eos"],
                              args.train_padding) for i in range(0, len(mine), args.batch_size)]
        window_loss, window_tokens = accumulate_gradients(model, batches, scaler, args, weight)
        loss_value = float(window_loss)  # checked before the step, so a bad loss never reaches the weights
        if not math.isfinite(loss_value):
            raise SystemExit(f"error: the training loss is {loss_value} at step {state['step']} (epoch {epoch}); "
                             f"stopping. Try a lower --lr, or --precision bf16/32 instead of 16.")
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)  # skipped by the fp16 scaler when gradients overflowed
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

        state["step"] += 1
        state["step_in_epoch"] = window_index + 1
        interval["loss"] += loss_value
        interval["steps"] += 1
        interval["tokens"] += window_tokens
        if state["step"] % args.log_interval == 0 or window_index == len(windows) - 1:
            seconds = time.time() - interval["start"]
            record = {"type": "train", "step": state["step"], "epoch": epoch,
                      "loss": interval["loss"] / interval["steps"], "lr": lr, "grad_norm": float(grad_norm),
                      "ms_per_step": 1000 * seconds / interval["steps"], "tokens_per_s": interval["tokens"] / seconds}
            log(record, f"epoch {epoch} step {state['step']}/{total_steps}: loss {record['loss']:.4f} "
                        f"lr {lr:.2e} grad norm {record['grad_norm']:.2f} {record['ms_per_step']:.0f} ms/step "
                        f"{record['tokens_per_s']:.0f} tokens/s")
            interval = {"loss": 0.0, "steps": 0, "tokens": 0, "start": time.time()}
        stop = args.stop_after_steps and state["step"] >= state["start_step"] + args.stop_after_steps
        if stop or (args.checkpoint_every and state["step"] % args.checkpoint_every == 0):
            save_checkpoint(args, model, optimizer, scaler, state, data["tokenizer"])
        if stop:
            return False
    return True


@torch.no_grad()
def validation_loss(model, data, args) -> float:
    """Mean token loss over every validation caption (teacher forcing)."""
    total, tokens = 0.0, 0
    pairs = [(i, j) for i, c in enumerate(data["captions"]) for j in range(len(c))]
    for start in range(0, len(pairs), args.eval_batch_size):
        image_tokens, input_ids, labels = make_batch(pairs[start:start + args.eval_batch_size], data["captions"],
                                                     data["tokens"], data["eos"])
        positions, targets = labelled_positions(labels)
        with autocast_context(args):
            logits = model(image_tokens.to(args.device), input_ids.to(args.device), positions.to(args.device))
        total += float(sequence_loss_sum(logits, targets.to(args.device)))
        tokens += int((labels != -100).sum())
    return total / tokens


def autocast_context(args):
    if args.precision == "32":
        return torch.autocast(device_type=torch.device(args.device).type, enabled=False)
    dtype = torch.float16 if args.precision == "16" else torch.bfloat16
    return torch.autocast(device_type=torch.device(args.device).type, dtype=dtype)


# ---------------------------------------------------------------------------------------------------------
# ---- checkpoints ----

# Settings that a resumed run must share with the run it continues (others, like --max-epochs, may change).
RESUME_MUST_MATCH = ("vision_backbone", "image_grid", "language_model", "batch_size", "accumulate_grad_batches",
                     "world_size",
                     "seed", "one_caption_per_image", "train_padding", "max_caption_tokens", "data_dir",
                     "max_epochs", "lr", "lr_schedule", "warmup_fraction", "min_lr_ratio", "weight_decay",
                     "grad_clip", "beam_size", "max_length")


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), numpy_state[2], numpy_state[3], numpy_state[4]],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_states(states: dict):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(args, model, optimizer, scaler, state, tokenizer):
    """Called by every process (each contributes its RNG state); rank 0 writes OUT/checkpoint.pt."""
    model = getattr(model, "module", model)  # the model inside DistributedDataParallel
    states = [rng_states()]
    if args.world_size > 1:
        states = [None] * args.world_size
        dist.all_gather_object(states, rng_states())
    if args.rank != 0:
        return
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(model.config),
        "tokenizer": tokenizer_to_data(tokenizer),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "state": {k: state[k] for k in ("step", "epoch", "step_in_epoch", "best_bleu4", "best_val_loss")},
        "rng": states,  # one per process
        "args": {k: getattr(args, k) for k in RESUME_MUST_MATCH + ("precision",)},
    }
    atomic_torch_save(checkpoint, os.path.join(args.out_dir, "checkpoint.pt"))


def trim_log(log_path: str, last_step: int):
    """On resume, drop log records of steps after the checkpoint: those steps are about to run again."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= last_step:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the interruption
    if len(kept) != len(lines):
        atomic_write_text(log_path, "".join(kept))
        print(f"{log_path}: dropped {len(lines) - len(kept)} records after step {last_step}, which run again now")


def load_checkpoint(args):
    path = os.path.join(args.out_dir, "checkpoint.pt")
    checkpoint = safe_torch_load(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    missing = {"model", "config", "tokenizer", "optimizer", "scaler", "state", "rng", "args"} - set(checkpoint)
    if missing:
        raise ArchiveError(f"{path}: damaged checkpoint: no {', '.join(sorted(missing))}")
    different = {k: (checkpoint["args"].get(k), getattr(args, k)) for k in RESUME_MUST_MATCH
                 if checkpoint["args"].get(k) != getattr(args, k)}
    if different:
        raise SystemExit(f"error: {path} was written with other settings; resume with the same ones: " +
                         ", ".join(f"--{k.replace('_', '-')} {old!r} (now {new!r})" for k, (old, new) in different.items()))
    return checkpoint


# ---------------------------------------------------------------------------------------------------------
# ---- several processes (torchrun) ----

def setup_distributed(args):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them this is one process, rank 0 of 1.
    Sets args.rank, args.world_size and, on CUDA, args.device to this process's GPU."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args.rank = int(os.environ.get("RANK", "0"))
    if args.world_size == 1:
        return
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    # gloo runs on CPUs (and the test); rank 0 may evaluate or embed images for a while between collectives
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))


def barrier(args):
    if args.world_size > 1:
        dist.barrier()


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

def get_args_parser():
    parser = argparse.ArgumentParser("Train a caption decoder on frozen image embeddings", add_help=True)
    # model
    parser.add_argument("--vision-backbone", default="blip:base",
                        help="frozen image encoder: efficientnet-lite0, clip:ViT-B/32, clip:ViT-B/16, clip:ViT-L/14, "
                             "clip:ViT-L/14@336px, or clip:<local dir>")
    parser.add_argument("--image-grid", type=int, default=3,
                        help="image tokens per image = 1 global + grid x grid pooled patch tokens; "
                             "0 = the single global embedding (the original's design)")
    parser.add_argument("--language-model", default="distilgpt2",
                        help="GPT-2-family decoder: distilgpt2, gpt2, gpt2-medium, or a local directory with a "
                             "saved model and tokenizer")
    # data
    parser.add_argument("--data-dir", default="data/coco",
                        help="folder with a Karpathy-format dataset_coco.json and the images it names")
    parser.add_argument("--cache-dir", default=None,
                        help="where image embeddings are cached (default: $XDG_CACHE_HOME/captioner or "
                             "~/.cache/captioner); the data folder may be read-only")
    parser.add_argument("--max-caption-tokens", type=int, default=40,
                        help="training captions are cut to this many tokens, EOS included")
    parser.add_argument("--one-caption-per-image", action="store_true",
                        help="an epoch sees one random caption per image (the original) instead of all of them")
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding workers for embedding")
    # optimisation
    parser.add_argument("--max-epochs", type=int, default=10, help="passes over the training captions")
    parser.add_argument("--batch-size", type=int, default=32, help="captions per micro-batch")
    parser.add_argument("--accumulate-grad-batches", type=int, default=4,
                        help="micro-batches per optimizer step (effective batch = batch size x this)")
    parser.add_argument("--lr", type=float, default=1e-4,
                        help="peak learning rate (1e-4 suits fine-tuning distilgpt2; ~1e-3 a small decoder "
                             "trained from scratch)")
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                        help="cosine: linear warmup then cosine decay; constant: the original's fixed LR")
    parser.add_argument("--warmup-fraction", type=float, default=0.05, help="share of all steps spent warming up")
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    parser.add_argument("--weight-decay", type=float, default=0.01, help="AdamW decay on weight matrices")
    parser.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this")
    parser.add_argument("--train-padding", action="store_true",
                        help="train padding positions as EOS (the original's behaviour; for comparison only)")
    parser.add_argument("--precision", choices=["16", "bf16", "32"], default="16",
                        help="16: fp16 autocast + GradScaler; bf16: bf16 autocast; 32: fp32. "
                             "fp16 needs CUDA: on other devices it falls back to 32")
    parser.add_argument("--seed", type=int, default=0, help="seeds every RNG and the data order")
    # evaluation during training
    parser.add_argument("--beam-size", type=int, default=1, help="beams for validation BLEU after each epoch")
    parser.add_argument("--max-length", type=int, default=30, help="most tokens per decoded caption, EOS included")
    parser.add_argument("--eval-batch-size", type=int, default=128, help="images decoded together")
    # run
    parser.add_argument("--out-dir", default="out", help="model.pt, checkpoint.pt and log.jsonl go here")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true", help="start over even if OUT holds another run")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    parser.add_argument("--log-interval", type=int, default=50, help="optimizer steps per log line")
    parser.add_argument("--checkpoint-every", type=int, default=500,
                        help="also save OUT/checkpoint.pt every N optimizer steps (0: only after each epoch)")
    parser.add_argument("--stop-after-steps", type=int, default=0,
                        help="save a checkpoint and exit after N optimizer steps of this invocation "
                             "(for time-limited jobs; continue with --resume)")
    return parser


def check_args(args, parser):
    try:
        check_backbone_name(args.vision_backbone)
    except ValueError as e:
        parser.error(f"--vision-backbone: {e}")
    for name in ("max_epochs", "batch_size", "accumulate_grad_batches", "eval_batch_size", "beam_size",
                 "max_length", "log_interval", "max_caption_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.image_grid < 0 or args.lr <= 0 or args.grad_clip <= 0 or not 0 <= args.warmup_fraction < 1:
        parser.error("--image-grid must be >= 0, --lr and --grad-clip > 0, and --warmup-fraction in [0, 1)")
    args.device = args.device or default_device()
    if args.precision == "16" and torch.device(args.device).type != "cuda":
        print(f"note: fp16 autocast needs CUDA; on {args.device} training runs in fp32 (--precision 32)")
        args.precision = "32"
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.data_dir = os.path.abspath(args.data_dir)


def main(args):
    setup_distributed(args)
    try:
        run_training(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_training(args):
    is_main = args.rank == 0  # logs, evaluates and writes files
    say = print if is_main else (lambda *a, **k: None)
    run_files = [os.path.join(args.out_dir, f)
                 for f in ("checkpoint.pt", "model.pt", "log.jsonl", "metrics.json", "captions.jsonl")]
    if args.resume and not os.path.isfile(run_files[0]):
        raise SystemExit(f"error: --resume: {run_files[0]} does not exist")
    if not args.resume and not args.overwrite and any(os.path.exists(f) for f in run_files):
        raise SystemExit(f"error: {args.out_dir} already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out-dir")
    checkpoint = load_checkpoint(args) if args.resume else None

    # data: captions and cached image tokens
    splits = {split: read_karpathy(args.data_dir, split) for split in ("train", "val")}
    if checkpoint:
        try:
            model = CaptionModel(CaptionerConfig(**checkpoint["config"]))
            model.load_state_dict(checkpoint["model"])
            tokenizer = tokenizer_from_data(checkpoint["tokenizer"])
        except Exception as e:
            raise ArchiveError(f"{args.out_dir}/checkpoint.pt: damaged checkpoint: {e}") from None
    get_backbone = functools.cache(lambda: load_backbone(args.vision_backbone))  # loaded only if a cache is built
    tokens, cache_meta = {}, {}
    for split, items in splits.items():
        if not is_main:
            barrier(args)  # rank 0 builds the cache; the others then open it
        tokens[split], cache_meta[split] = cached_image_tokens(
            items, split, args.vision_backbone, args.image_grid, args.cache_dir, args.device,
            num_workers=args.num_workers, get_backbone=get_backbone)
        if is_main:
            barrier(args)
    get_backbone.cache_clear()  # frozen and cached: the backbone is not needed for training
    preprocessing = cache_meta["train"]["preprocessing"]  # stored in model.pt, checked when it is loaded

    # Seed here, after the cache: loading a backbone to build it draws random numbers (weight init), and
    # whether that happened must not change the decoder's initialisation or the dropout masks.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # also seeds every CUDA device
    if not checkpoint:
        model, tokenizer = build_model(args.language_model, args.vision_backbone,
                                       image_width=tokens["train"].shape[2], image_grid=args.image_grid)
    # Every process starts from the same weights, but each must draw its own dropout masks.
    torch.manual_seed(args.seed + args.rank)
    positions = model.decoder.config.n_positions
    if max(args.max_caption_tokens, args.max_length) > positions:
        raise SystemExit(f"error: {args.language_model} reads at most {positions} tokens; lower "
                         f"--max-caption-tokens ({args.max_caption_tokens}) and --max-length ({args.max_length})")
    model.to(args.device)
    if torch.device(args.device).type == "cuda":
        # TF32 matmuls for the fp32 parts (all of --precision 32): ~fp32 accuracy at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    data = {split: {"captions": tokenize_captions(tokenizer, items, args.max_caption_tokens),
                    "tokens": tokens[split], "eos": tokenizer.eos_token_id, "tokenizer": tokenizer}
            for split, items in splits.items()}

    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=args.precision == "16")
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "best_bleu4": -1.0, "best_val_loss": math.inf}
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] and scaler.is_enabled():  # empty when the run so far was not fp16
            scaler.load_state_dict(checkpoint["scaler"])
        if checkpoint["args"]["precision"] != args.precision:
            print(f"note: the run so far used --precision {checkpoint['args']['precision']}, now {args.precision}")
        state.update(checkpoint["state"])
        set_rng_states(checkpoint["rng"][args.rank])
    state["start_step"] = state["step"]
    # Gradients are averaged over processes during backward; the optimizer then steps identically everywhere.
    train_model = model
    if args.world_size > 1:
        train_model = DistributedDataParallel(model, device_ids=[torch.device(args.device)] if
                                              torch.device(args.device).type == "cuda" else None)

    train_captions = sum(len(c) for c in data["train"]["captions"])
    captions_per_epoch = len(splits["train"]) if args.one_caption_per_image else train_captions
    effective_batch = args.batch_size * args.accumulate_grad_batches * args.world_size
    steps_per_epoch = math.ceil(captions_per_epoch / effective_batch)
    total_steps = steps_per_epoch * args.max_epochs
    params = sum(p.numel() for p in model.parameters())
    say(f"device {args.device}, precision {args.precision}, decoder {args.language_model} "
          f"({params / 1e6:.1f}M parameters), backbone {args.vision_backbone}, "
          f"{model.config.num_image_tokens} image tokens per image")
    say(f"train {len(splits['train'])} images / {train_captions} captions, val {len(splits['val'])} images; "
          f"{captions_per_epoch} captions per epoch")
    say(f"effective batch {args.batch_size} x {args.accumulate_grad_batches} x {args.world_size} process"
        f"{'es' if args.world_size > 1 else ''} = {effective_batch} captions; {steps_per_epoch} optimizer steps per epoch, "
          f"{total_steps} in all; peak LR {args.lr:g} ({args.lr_schedule})")
    say(f"outputs: {args.out_dir}/model.pt (best epoch by val BLEU-4), checkpoint.pt, log.jsonl; "
          f"embedding cache {args.cache_dir}")
    if checkpoint:
        say(f"resuming at epoch {state['epoch']}, step {state['step']} ({state['step_in_epoch']} into the epoch)")

    # Everything is in place: only now replace an old run (--overwrite) or forget what followed the checkpoint.
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        if args.overwrite and not args.resume:
            for f in run_files:
                if os.path.exists(f):
                    os.remove(f)
        if checkpoint:
            trim_log(log_path, state["step"])

    def log(record, line):
        if not is_main:
            return
        print(line, flush=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    from evaluate import decode_image_tokens, bleu4_coco  # evaluate.py imports this file, so import late

    for epoch in range(state["epoch"], args.max_epochs):
        state["epoch"] = epoch
        epoch_start = time.time()
        if not train_one_epoch(train_model, optimizer, scaler, data["train"], epoch, state, total_steps, args, log):
            say(f"stopped after {args.stop_after_steps} steps; continue with --resume")
            return
        state.update(epoch=epoch + 1, step_in_epoch=0)
        if not is_main:  # rank 0 alone evaluates; the others wait for it here, then all save the checkpoint
            barrier(args)
            save_checkpoint(args, model, optimizer, scaler, state, tokenizer)
            continue
        # validation: teacher-forced loss and BLEU-4 of real decoding (decoding leaves the mode to its caller)
        model.eval()
        val_loss = validation_loss(model, data["val"], args)
        captions = decode_image_tokens(model, tokenizer, data["val"]["tokens"], args.beam_size, args.device,
                                       args.eval_batch_size, args.max_length)
        val_bleu4 = bleu4_coco(captions, [item["captions"] for item in splits["val"]])
        model.train()
        # best by validation BLEU-4; ties (0.0 early on, say) go to the lower validation loss
        best = (val_bleu4, -val_loss) > (state["best_bleu4"], -state["best_val_loss"])
        if best:
            state["best_bleu4"], state["best_val_loss"] = val_bleu4, val_loss
            save_model(os.path.join(args.out_dir, "model.pt"), model, tokenizer, preprocessing,
                       {"epoch": epoch, "step": state["step"], "val_bleu4_coco": val_bleu4, "val_loss": val_loss,
                        "beam_size": args.beam_size})
        log({"type": "epoch", "epoch": epoch, "step": state["step"], "val_loss": val_loss, "val_bleu4": val_bleu4,
             "best": best, "seconds": time.time() - epoch_start, "example": captions[0]},
            f"epoch {epoch}: val loss {val_loss:.4f}, val BLEU-4 {val_bleu4:.4f} (beam {args.beam_size})"
            f"{' (best so far, saved model.pt)' if best else ''}; e.g. {captions[0]!r}")
        barrier(args)
        save_checkpoint(args, model, optimizer, scaler, state, tokenizer)
    say(f"done: best val BLEU-4 {state['best_bleu4']:.4f}; model in {args.out_dir}/model.pt")


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(args, parser)
    try:
        main(args)
    except (ArchiveError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}")
