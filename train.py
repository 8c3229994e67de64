"""
Train a caption decoder on frozen image embeddings.

    python train.py --data-dir data/coco                                  # BLIP base + distilgpt2, on COCO
    python train.py --data-dir ../shared/coco-mini --vision-backbone efficientnet-lite0 \\
        --language-model runs/small-decoder --lr 1e-3                     # offline, on a CPU (see tools/)

data.py provides the captions and the backbone's image tokens (cached on disk); this file runs a hand-rolled
loop: autocast (bf16, fp16 + GradScaler, or fp32), gradient accumulation whose gradient equals the one big
batch, AdamW with warmup + cosine, clipping. After every epoch it measures the validation loss, BLEU-4 and
CIDEr-D (real decoding) and keeps the best epoch in OUT/model.pt; the full training state goes to
OUT/checkpoint.pt, so that --resume continues exactly where the run stopped.

Several GPUs: `torchrun --nproc_per_node=N train.py ...` runs DistributedDataParallel; every optimizer step
then sees batch size x accumulation x N captions, and rank 0 alone logs, evaluates and writes files.
"""

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import signal
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from captioner import (ArchiveError, CaptionModel, CaptionerConfig, LockedError, atomic_torch_save,
                       atomic_write_text, autocast, build_model, caption_image_tokens, check_backbone_name,
                       cpu_state_dict, default_device, embedding_precision, file_lock, labelled_positions,
                       remove_orphans, safe_torch_load, save_model, tokenizer_from_data, tokenizer_to_data)
from data import DownloadError, default_cache_dir, tokenize_captions, training_splits
from evaluate import coco_metrics

CHECKPOINT_FORMAT = "captioner-checkpoint"
CHECKPOINT_VERSION = 1

# ---------------------------------------------------------------------------------------------------------
# ---- several processes (torchrun) ----

@dataclass
class Processes:
    """This process among torchrun's (RANK, WORLD_SIZE, LOCAL_RANK); without torchrun, rank 0 of 1."""
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    wait_group: object = None  # a gloo group with a long timeout, for waiting on rank 0

    @property
    def is_main(self) -> bool:  # rank 0 logs, evaluates and writes files
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(group=self.wait_group)

    @classmethod
    def start(cls, device: str) -> "Processes":
        world_size, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
        if world_size == 1:
            return cls(0, 1, device)
        if int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) != world_size:
            raise SystemExit("error: train.py runs on one machine (its processes share the embedding cache "
                             "through memory maps); start torchrun with --nnodes=1")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")  # gloo runs on CPUs (and the test)
        # Waiting for rank 0 (a 20 GB download, embedding, evaluating) goes through a CPU group with a long
        # timeout, so that it does not trip the short timeout meant to catch a hung GPU collective.
        wait_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=1))
        return cls(rank, world_size, device, wait_group)


# ---------------------------------------------------------------------------------------------------------
# ---- batches ----

def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Seeded by a hash of (seed, epoch): no two pairs share an order, as seed * 1000 + epoch would."""
    return seeded_generator("epoch order", seed, epoch)


def seeded_generator(purpose: str, seed: int, epoch: int) -> torch.Generator:
    digest = hashlib.sha256(f"{purpose} {seed} {epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def epoch_order(captions, epoch: int, seed: int, one_caption_per_image: bool) -> list[tuple[int, int]]:
    """(image, caption) pairs of one epoch, shuffled by a generator seeded from (seed, epoch) alone, so the
    order can be recomputed on resume."""
    generator = epoch_generator(seed, epoch)
    if one_caption_per_image:
        picks = [int(torch.randint(len(c), (1,), generator=generator)) for c in captions]
        pairs = list(enumerate(picks))
    else:
        pairs = [(i, j) for i, c in enumerate(captions) for j in range(len(c))]
    return [pairs[k] for k in torch.randperm(len(pairs), generator=generator).tolist()]


def epoch_windows(captions, epoch: int, args, world_size: int = 1) -> list[list[tuple[int, int]]]:
    """The epoch's optimizer steps: windows of batch size x accumulation x world size (image, caption) pairs;
    the last, shorter window is kept, not dropped. With --bucket-windows N, the shuffled pairs are cut into
    chunks of N windows, each chunk is sorted by caption length before it is cut into windows, and the windows
    are shuffled: a micro-batch then holds captions of about one length, so it carries little padding, while
    the data stays shuffled at the scale of a chunk. A pure function of (seed, epoch), like epoch_order."""
    pairs = epoch_order(captions, epoch, args.seed, args.one_caption_per_image)
    size = args.batch_size * args.accumulate_grad_batches * world_size
    if args.bucket_windows:
        chunk = size * args.bucket_windows
        pairs = [pair for start in range(0, len(pairs), chunk)
                 for pair in sorted(pairs[start:start + chunk], key=lambda p: len(captions[p[0]][p[1]]))]
    windows = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    if args.bucket_windows:  # the short last window stays last, as in the plain order
        generator = seeded_generator("window order", args.seed, epoch)  # not the pairs' generator again
        order = torch.randperm(len(windows) - 1, generator=generator).tolist()
        windows = [windows[k] for k in order] + windows[-1:]
    return windows


def padding_fraction(windows, captions, batch_size: int) -> float:
    """Share of the token positions in the epoch's micro-batches that are padding."""
    padded = real = 0
    for window in windows:
        for i in range(0, len(window), batch_size):
            lengths = [len(captions[a][b]) for a, b in window[i:i + batch_size]]
            padded, real = padded + max(lengths) * len(lengths), real + sum(lengths)
    return 1 - real / padded


def make_batch(pairs, captions, image_tokens, eos: int, train_padding: bool = False):
    """-> image tokens (B, K, D) float16, input_ids (B, T), labels (B, T) with -100 on padding.
    Each sequence is EOS + caption + EOS; inputs drop the last token, labels drop the first."""
    sequences = [[eos] + captions[i][j] for i, j in pairs]
    T = max(len(s) for s in sequences) - 1
    input_ids = torch.full((len(pairs), T), eos, dtype=torch.long)
    labels = torch.full((len(pairs), T), eos if train_padding else -100, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s) - 1] = torch.tensor(s[:-1])
        labels[row, : len(s) - 1] = torch.tensor(s[1:])
    index = [i for i, _ in pairs]
    if torch.is_tensor(image_tokens):  # the split's tokens are on the GPU: gather there; only indices travel
        rows = to_device(torch.tensor(index), image_tokens.device)
        return image_tokens.index_select(0, rows), input_ids, labels
    return torch.from_numpy(np.ascontiguousarray(image_tokens[index])), input_ids, labels  # (B, K, D) fp16


def to_device(tensor, device):
    """Host to device without waiting: pinned memory lets the copy run behind the GPU's queue."""
    if torch.device(device).type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


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
    # fused: one kernel for all parameters, and it can skip a step on the device (see optimizer_step)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


def my_share(window: list, rank: int, world_size: int) -> tuple[list, float]:
    """This process's captions of one optimizer step's window, and their weight. Process r takes every
    world_size-th caption. The epoch's last window can be too short to give every process one, but every
    process must still join the gradient all-reduce: one left empty runs the window's first caption with
    weight 0, which adds nothing to the gradient.

    >>> my_share(["a", "b", "c"], rank=1, world_size=4)
    (['b'], 1.0)
    >>> my_share(["a", "b", "c"], rank=3, world_size=4)
    (['a'], 0.0)
    """
    mine = window[rank::world_size]
    return (mine, 1.0) if mine else (window[:1], 0.0)


def accumulate_gradients(model, batches, scaler, processes: Processes, precision: str, weight: float = 1.0):
    """Forward and backward over this process's micro-batches of one optimizer step -> (mean token loss of
    the whole window over all processes, as a tensor; caption tokens in the window)."""
    window_tokens = sum(int((labels != -100).sum()) for _, _, labels in batches) * int(weight != 0)
    if processes.world_size > 1:
        counts = torch.tensor([float(window_tokens)], device=processes.device)
        dist.all_reduce(counts)  # SUM over processes
        window_tokens = int(counts.item())
    # The step's loss is the mean over the window's tokens: the sum of every token's cross-entropy divided
    # by window_tokens. So each micro-batch adds its token SUM / window_tokens (a mean per micro-batch would
    # over-weight short ones), however the window is split into micro-batches and processes. DDP averages
    # gradients over processes; the factor world_size turns that average back into the sum.
    scale = weight * processes.world_size / window_tokens
    window_loss = torch.zeros((), device=processes.device)
    for k, (image_tokens, input_ids, labels) in enumerate(batches):
        positions, targets = labelled_positions(labels)  # on the CPU, where no synchronisation is needed
        image_tokens, input_ids, positions, targets = (to_device(t, processes.device)
                                                       for t in (image_tokens, input_ids, positions, targets))
        # DDP all-reduces gradients during backward; once per optimizer step is enough: the last micro-batch
        last = k == len(batches) - 1
        with model.no_sync() if processes.world_size > 1 and not last else contextlib.nullcontext():
            with autocast(processes.device, precision):
                _, loss_sum = model(image_tokens, input_ids, positions, targets)
            loss = loss_sum * scale
            scaler.scale(loss).backward()
        window_loss += loss.detach()
    if processes.world_size > 1:
        dist.all_reduce(window_loss)  # every process sees the same loss, so all stop together if it is bad
    return window_loss / processes.world_size, window_tokens


def optimizer_step(optimizer, scaler, loss, grad_norm=None):
    """Step, unless the loss or the gradient norm is not finite, decided on the device: the host never waits
    for the GPU here. Fused AdamW skips its update where `found_inf` is set (GradScaler's protocol); the fp16
    scaler sets it itself from the gradients. Other optimizers check on the host."""
    finite = torch.isfinite(loss) if grad_norm is None else torch.isfinite(loss) & torch.isfinite(grad_norm)
    if scaler.is_enabled():
        scaler.step(optimizer)
    elif optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        del optimizer.found_inf
    elif bool(finite):
        optimizer.step()
    scaler.update()


class Interval:
    """The steps since the last log line. Their losses stay on the device until `close`, the one host
    synchronisation of the interval, which also stops the run if one of them was not finite."""

    def __init__(self):
        self.losses, self.tokens, self.start = [], 0, time.time()

    def add(self, loss, tokens: int):
        self.losses.append(loss)
        self.tokens += tokens

    def close(self, step: int, epoch: int) -> dict:
        """-> mean loss, ms/step and tokens/s of the interval, which ends at optimizer step `step`."""
        losses = torch.stack(self.losses).tolist()
        bad = [k for k, value in enumerate(losses) if not math.isfinite(value)]
        if bad:
            first = step - len(losses) + bad[0]
            raise SystemExit(f"error: the training loss is {losses[bad[0]]} at step {first} (epoch {epoch}); "
                             f"stopped, and no step with a non-finite loss changed the weights. With "
                             f"--precision 16, --resume --precision bf16 (or 32) continues from the last "
                             f"checkpoint; otherwise start a new run with a lower --lr (--overwrite)")
        seconds = time.time() - self.start
        return {"loss": sum(losses) / len(losses), "ms_per_step": 1000 * seconds / len(losses),
                "tokens_per_s": self.tokens / seconds}


def train_one_epoch(model, optimizer, scaler, data, epoch, state, total_steps, args, processes, log, save,
                    stop_request) -> bool:
    """Run the optimizer steps of one epoch from state.step_in_epoch on; save() writes a checkpoint. Returns
    False if the run must stop early (--stop-after-steps, a signal; a checkpoint is saved), True when the
    epoch is complete."""
    model.train()
    windows = epoch_windows(data["captions"], epoch, args, processes.world_size)
    stop_at = state.step + args.stop_after_steps if args.stop_after_steps else None
    interval = Interval()
    for window_index in range(state.step_in_epoch, len(windows)):
        lr = get_lr(state.step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine, weight = my_share(windows[window_index], processes.rank, processes.world_size)
        batches = [make_batch(mine[i:i + args.batch_size], data["captions"], data["tokens"], data["eos"],
                              args.train_padding) for i in range(0, len(mine), args.batch_size)]
        loss, window_tokens = accumulate_gradients(model, batches, scaler, processes, args.precision, weight)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer_step(optimizer, scaler, loss, grad_norm)
        optimizer.zero_grad(set_to_none=True)

        state.step += 1
        state.step_in_epoch = window_index + 1
        interval.add(loss, window_tokens)
        stop = (stop_at is not None and state.step >= stop_at) or stop_request.requested()
        checkpoint = stop or (args.checkpoint_every and state.step % args.checkpoint_every == 0)
        if checkpoint or state.step % args.log_interval == 0 or window_index == len(windows) - 1:
            record = {"type": "train", "step": state.step, "epoch": epoch,
                      **interval.close(state.step, epoch), "lr": lr, "grad_norm": float(grad_norm)}
            log(record, f"epoch {epoch} step {state.step}/{total_steps}: loss {record['loss']:.4f} "
                        f"lr {lr:.2e} grad norm {record['grad_norm']:.2f} {record['ms_per_step']:.0f} "
                        f"ms/step {record['tokens_per_s']:.0f} tokens/s")
            interval = Interval()
        if checkpoint:
            save()
        if stop:
            return False
    return True


# ---------------------------------------------------------------------------------------------------------
# ---- validation ----

@torch.no_grad()
def validation_loss(model, data, args, device) -> float:
    """Mean token loss over every validation caption (teacher forcing)."""
    total, tokens = 0.0, 0
    pairs = [(i, j) for i, c in enumerate(data["captions"]) for j in range(len(c))]
    for start in range(0, len(pairs), args.eval_batch_size):
        batch = make_batch(pairs[start:start + args.eval_batch_size], data["captions"], data["tokens"],
                           data["eos"])
        image_tokens, input_ids, (positions, targets) = batch[0], batch[1], labelled_positions(batch[2])
        with autocast(device, args.precision):
            _, loss_sum = model(*(t.to(device) for t in (image_tokens, input_ids, positions, targets)))
        total, tokens = total + float(loss_sum), tokens + len(targets)
    return total / tokens


def validate(model, data, args, device) -> dict:
    """-> validation loss, BLEU-4 and CIDEr-D (COCO protocol) of real decoding, and the first caption."""
    model.eval()  # decoding leaves the mode to its caller
    val_loss = validation_loss(model, data, args, device)
    captions = caption_image_tokens(model, data["tokenizer"], data["host_tokens"], args.beam_size, device,
                                    args.eval_batch_size, args.max_length)
    model.train()
    scores, _ = coco_metrics(captions, data["references"])
    return {"val_loss": val_loss, "val_bleu4": scores["bleu4"], "val_cider_d": scores["cider_d"],
            "example": captions[0]}


# ---------------------------------------------------------------------------------------------------------
# ---- checkpoints ----

@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch running (or next to run)
    step_in_epoch: int = 0  # its optimizer steps done
    best_score: float = -1.0  # the --select-by figure of the epoch in model.pt
    best_val_loss: float = math.inf

    @classmethod
    def from_checkpoint(cls, state: dict) -> "TrainState":
        state = dict(state)
        if "best_bleu4" in state:  # checkpoints from before --select-by
            state["best_score"] = state.pop("best_bleu4")
        return cls(**state)


# Settings that a resumed run must share with the run it continues. Others may change: --max-epochs (the LR
# schedule is then recomputed for the new length), --precision (the image tokens keep the run's precision).
RESUME_MUST_MATCH = ("vision_backbone", "image_grid", "language_model", "batch_size",
                     "accumulate_grad_batches", "seed", "one_caption_per_image", "train_padding",
                     "max_caption_tokens", "data_dir", "lr", "lr_schedule", "warmup_fraction", "min_lr_ratio",
                     "weight_decay", "grad_clip", "beam_size", "max_length", "bucket_windows", "select_by")
LEGACY = {"bucket_windows": 0, "select_by": "bleu4"}  # how runs from before these settings existed ran


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
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


def save_checkpoint(path, processes, model, optimizer, scaler, state, tokenizer, settings: dict):
    """Called by every process (each contributes its RNG state); rank 0 writes `path`. `settings`: plain
    data that load_checkpoint compares on resume."""
    model = getattr(model, "module", model)  # the model inside DistributedDataParallel
    states = [rng_states()]
    if processes.world_size > 1:
        states = [None] * processes.world_size
        dist.all_gather_object(states, rng_states())
    if not processes.is_main:
        return
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": cpu_state_dict(model),
                  "config": asdict(model.config), "tokenizer": tokenizer_to_data(tokenizer),
                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": asdict(state),
                  "rng": states,  # one per process
                  "args": {**settings, "world_size": processes.world_size}}
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path: str, settings: dict, must_match, world_size: int) -> dict:
    """Read a checkpoint; refuse it, naming the flags, if it was written with other `must_match` settings."""
    checkpoint = safe_torch_load(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    needed = {"model", "config", "tokenizer", "optimizer", "scaler", "state", "rng", "args"}
    missing = needed - set(checkpoint)
    if missing:
        raise ArchiveError(f"{path}: damaged checkpoint: no {', '.join(sorted(missing))}")
    saved = {**LEGACY, "world_size": 1, **checkpoint["args"]}
    different = {k: (saved.get(k), settings[k]) for k in must_match if saved.get(k) != settings[k]}
    if saved["world_size"] != world_size:
        different["nproc-per-node"] = (saved["world_size"], world_size)
    if different:
        raise SystemExit(f"error: {path} was written with other settings; resume with the same ones: " +
                         ", ".join(f"--{k.replace('_', '-')} {old!r} (now {new!r})"
                                   for k, (old, new) in different.items()))
    return checkpoint


def trim_log(log_path: str, state: TrainState):
    """On resume, drop the log records of what is about to run again: steps after the checkpoint, and the
    validation of an epoch the checkpoint had not finished (a run can die between logging it and saving)."""
    if not os.path.isfile(log_path):
        return
    with open(log_path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
            unfinished_epoch = record["type"] == "epoch" and record["epoch"] >= state.epoch
            if record["step"] <= state.step and not unfinished_epoch:
                kept.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # a line cut short by the interruption
    if len(kept) != len(lines):
        atomic_write_text(log_path, "".join(kept))
        print(f"{log_path}: dropped {len(lines) - len(kept)} records after step {state.step} (to run again)")


# ---------------------------------------------------------------------------------------------------------
# ---- a run's safety: one run per out dir, signals ----

@contextlib.contextmanager
def out_dir_lock(out_dir: str):
    """One run per --out-dir: a second one is refused at once, naming the first. Also finds a read-only
    --out-dir before anything is built, and removes what a killed save left behind."""
    lock_path = os.path.join(out_dir, ".lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        os.close(os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666))
    except OSError as e:  # PermissionError, or EROFS on a read-only file system
        raise SystemExit(f"error: {out_dir}: cannot write here ({e.strerror}); choose another "
                         f"--out-dir") from None
    held = contextlib.ExitStack()  # entered here, so that only taking the lock is caught below, not the run
    try:
        held.enter_context(file_lock(lock_path, out_dir, wait=False))
    except LockedError as e:
        raise SystemExit(f"error: {e}; wait for it to finish or choose another --out-dir") from None
    with held:
        remove_orphans(out_dir)
        yield


class StopRequest:
    """SIGINT (Ctrl-C) or SIGTERM while training: finish the optimizer step, save a checkpoint, then stop.
    A second signal stops at once (nothing is lost: --resume goes on from the last checkpoint)."""

    def __init__(self, processes: Processes):
        self.processes, self.signal = processes, None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        # os.write, not print: a handler that prints while the main thread prints raises "reentrant call"
        os.write(2, f"{self.signal}: finishing this optimizer step, then saving a checkpoint (again to stop "
                    f"at once)\n".encode())

    def requested(self) -> bool:
        """Whether to stop now; with several processes, all stop together (a collective: call it on all)."""
        if self.processes.world_size == 1:
            return self.signal is not None
        flag = torch.tensor([float(self.signal is not None)], device=self.processes.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def interrupt(signum, frame):
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

def get_args_parser():
    parser = argparse.ArgumentParser("Train a caption decoder on frozen image embeddings", add_help=True)
    add = parser.add_argument
    # model
    add("--vision-backbone", default="blip:base",
        help="frozen image encoder: blip:base (BLIP ViT-B/16 CapFilt-L at 224 px, as LAVIS ran it), "
             "efficientnet-lite0, clip:ViT-B/32, clip:ViT-B/16, clip:ViT-L/14, clip:ViT-L/14@336px, "
             "clip:<dir>")
    add("--image-grid", type=int, default=3,
        help="image tokens per image = 1 global + grid x grid pooled patch tokens; 0 = the single global "
             "embedding (the original's design)")
    add("--language-model", default="distilgpt2",
        help="GPT-2-family decoder: distilgpt2, gpt2, gpt2-medium, or a local folder with a model and "
             "tokenizer")
    # data (and --data-dir, --cache-dir, --num-workers: see add_shared_arguments)
    add("--max-caption-tokens", type=int, default=40,
        help="training captions are cut to this many tokens, EOS included")
    add("--one-caption-per-image", action="store_true",
        help="an epoch sees one random caption per image (the original) instead of all of them")
    add("--download", action=argparse.BooleanOptionalAction, default=True,
        help="fetch what --data-dir lacks of COCO's Karpathy split (dataset_coco.json, train2014.zip and "
             "val2014.zip: 20 GB, resumable); a dataset_coco.json with its images needs nothing")
    add_shared_arguments(parser)
    # train.py's own
    add("--train-padding", action="store_true",
        help="train padding positions as EOS (the original's behaviour; for comparison only)")
    add("--bucket-windows", type=int, default=0,
        help="sort the captions by length within chunks of this many optimizer steps, so that micro-batches "
             "carry little padding (0: the plain shuffle; 50 cut coco-mini's padding from 49%% to 3%% but "
             "also its val BLEU-4 after 3 epochs, from 0.099 to 0.069)")
    add("--tokens-on-device", action=argparse.BooleanOptionalAction, default=None,
        help="keep the splits' image tokens in GPU memory and gather batches there (default: on CUDA)")
    add("--compile", action=argparse.BooleanOptionalAction, default=False,
        help="torch.compile the model for training (the first steps then include the compilation)")
    add("--beam-size", type=int, default=1, help="beams for the validation captions after each epoch")
    add("--select-by", choices=["bleu4", "cider_d"], default="bleu4",
        help="the validation figure (COCO protocol) that picks the epoch kept in model.pt")
    return parser


def add_shared_arguments(parser):
    """The flags that scst.py shares with train.py (it sets some other defaults): data, optimisation,
    validation decoding, and the run's files."""
    add = parser.add_argument
    add("--data-dir", default="data/coco",
        help="folder with a Karpathy-format dataset_coco.json and its images")
    add("--cache-dir", default=None, help="where image embeddings are cached (default: "
                                          "$XDG_CACHE_HOME/captioner/embeddings or "
                                          "~/.cache/captioner/embeddings)")
    add("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
        help="image decoding workers per process while embedding (default: CPU cores, at most 8)")
    # optimisation
    add("--max-epochs", type=int, default=10, help="passes over the training data (default %(default)s)")
    add("--batch-size", type=int, default=128,
        help="micro-batch size (default %(default)s): captions in train.py (the original: 32), images in "
             "scst.py (each sampled --samples-per-image times)")
    add("--accumulate-grad-batches", type=int, default=1,
        help="micro-batches per optimizer step (effective batch = batch size x this x processes; the "
             "original: 4)")
    add("--lr", type=float, default=1e-4,
        help="peak learning rate (default %(default)s; 1e-4 suits fine-tuning distilgpt2, ~1e-3 a small "
             "decoder trained from scratch; SCST wants less: 1e-4 on coco-mini's small decoder)")
    add("--lr-schedule", choices=["cosine", "constant"], default="cosine",
        help="cosine: linear warmup then cosine decay; constant: a fixed LR, the original's (default "
             "%(default)s)")
    add("--warmup-fraction", type=float, default=0.05, help="share of all steps spent warming up (cosine)")
    add("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr (cosine)")
    add("--weight-decay", type=float, default=0.01,
        help="AdamW decay on weight matrices (default %(default)s)")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this")
    add("--precision", choices=["auto", "16", "bf16", "32"], default="auto",
        help="16: fp16 autocast + GradScaler (the original; for GPUs without bf16); bf16: bf16 autocast; "
             "32: fp32 (TF32 on CUDA). auto: bf16 on a GPU that has it, else 16 on CUDA, else 32")
    add("--seed", type=int, default=0, help="seeds every RNG and the data order")
    # validation after each epoch
    add("--max-length", type=int, default=30, help="most tokens per decoded caption, EOS included")
    add("--eval-batch-size", type=int, default=128, help="images decoded together")
    # run
    add("--out-dir", default="out",
        help="model.pt, checkpoint.pt and log.jsonl go here (default %(default)s)")
    add("--resume", action="store_true", help="continue the run saved in OUT/checkpoint.pt")
    add("--overwrite", action="store_true", help="start over even if OUT holds another run")
    add("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    add("--log-interval", type=int, default=50, help="optimizer steps per log line (default %(default)s)")
    add("--checkpoint-every", type=int, default=500,
        help="also save OUT/checkpoint.pt every N optimizer steps (0: only after each epoch; default "
             "%(default)s)")
    add("--stop-after-steps", type=int, default=0,
        help="save a checkpoint and exit after N optimizer steps of this invocation (0: run to the end); "
             "continue with --resume")


MAX_IMAGE_GRID = 16  # 257 image tokens; the backbones' patch grids are 7 x 7 to 24 x 24
RUN_FILES = ("checkpoint.pt", "model.pt", "log.jsonl", "metrics.json", "captions.jsonl")


def check_args(args, parser):
    try:
        check_backbone_name(args.vision_backbone)
    except ValueError as e:
        parser.error(f"--vision-backbone: {e}")
    for name in ("beam_size", "max_caption_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.bucket_windows < 0:
        parser.error("--bucket-windows must be 0 (off) or more")
    if not 0 <= args.image_grid <= MAX_IMAGE_GRID:
        parser.error(f"--image-grid must be in [0, {MAX_IMAGE_GRID}] (1 + grid x grid image tokens per "
                     f"image)")
    check_shared_args(args, parser)
    if args.tokens_on_device is None:
        args.tokens_on_device = torch.device(args.device).type == "cuda"


def check_shared_args(args, parser):
    """Checks the flags of add_shared_arguments, and resolves --device, --precision auto and --cache-dir."""
    for name in ("max_epochs", "batch_size", "accumulate_grad_batches", "eval_batch_size", "max_length",
                 "log_interval"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("checkpoint_every", "stop_after_steps", "num_workers"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (off) or more")
    for name in ("lr", "weight_decay", "grad_clip", "warmup_fraction", "min_lr_ratio"):
        if not math.isfinite(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, not {getattr(args, name)}")
    if args.lr <= 0 or args.grad_clip <= 0 or args.weight_decay < 0:
        parser.error("--lr and --grad-clip must be > 0, --weight-decay >= 0")
    if not 0 <= args.warmup_fraction < 1 or not 0 <= args.min_lr_ratio <= 1:
        parser.error("--warmup-fraction must be in [0, 1) and --min-lr-ratio in [0, 1] (a negative floor "
                     "would end the run in gradient ascent)")
    args.device = args.device or default_device()
    try:
        cuda = torch.device(args.device).type == "cuda"
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device torch knows (cuda, cuda:N, mps, cpu)")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available here")
    if args.precision == "auto":  # emulated bf16 (T4, V100) is slower than fp16 + GradScaler
        args.precision = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "16") \
            if cuda else "32"
    if args.precision == "16" and not cuda:
        print(f"note: fp16 autocast needs CUDA; on {args.device} training runs in fp32 (--precision 32)")
        args.precision = "32"
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.data_dir = os.path.abspath(args.data_dir)


def check_out_dir(args):
    """Refuse early to overwrite or to resume what is not there."""
    checkpoint_path = os.path.join(args.out_dir, "checkpoint.pt")
    if args.resume and not os.path.isfile(checkpoint_path):
        raise SystemExit(f"error: --resume: {checkpoint_path} does not exist")
    if not args.resume and not args.overwrite and any(os.path.exists(os.path.join(args.out_dir, f))
                                                      for f in RUN_FILES):
        raise SystemExit(f"error: {args.out_dir} already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out-dir")


def run_settings(args) -> dict:
    """What a checkpoint records of the run's flags."""
    recorded = RESUME_MUST_MATCH + ("precision", "max_epochs", "embedding_precision")
    return {k: getattr(args, k) for k in recorded}


def model_from(checkpoint, args, image_width: int):
    """The model and tokenizer: the checkpoint's when resuming, else a new model around the pretrained LM."""
    if checkpoint is None:
        return build_model(args.language_model, args.vision_backbone, image_width=image_width,
                           image_grid=args.image_grid)
    try:
        model = CaptionModel(CaptionerConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        return model, tokenizer_from_data(checkpoint["tokenizer"])
    except Exception as e:
        raise ArchiveError(f"{args.out_dir}/checkpoint.pt: damaged checkpoint: {e}") from None


def main(args):
    processes = Processes.start(args.device)
    try:
        with out_dir_lock(args.out_dir) if processes.is_main else contextlib.nullcontext():
            train(args, processes)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, processes: Processes):
    say = print if processes.is_main else (lambda *a, **k: None)
    device = processes.device
    check_out_dir(args)
    checkpoint_path = os.path.join(args.out_dir, "checkpoint.pt")
    # image tokens keep the precision the run started with, whatever --precision a resumed run gives
    args.embedding_precision = embedding_precision(device, args.precision)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(checkpoint_path, run_settings(args), RESUME_MUST_MATCH,
                                     processes.world_size)
        args.embedding_precision = checkpoint["args"].get("embedding_precision", "32")

    # data: captions and cached image tokens
    splits = training_splits(args.data_dir, args.vision_backbone, args.image_grid, args.cache_dir,
                             args.embedding_precision, args.num_workers, processes, args.download)

    # model. Seeded after the cache: loading a backbone to build it draws random numbers (weight init), and
    # whether that happened must not change the decoder's initialisation or the dropout masks.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # also seeds every CUDA device
    model, tokenizer = model_from(checkpoint, args, image_width=splits["train"]["tokens"].shape[2])
    torch.manual_seed(args.seed + processes.rank)  # the same weights everywhere, each its own dropout masks
    positions = model.decoder.config.n_positions
    if max(args.max_caption_tokens, args.max_length) > positions:
        raise SystemExit(f"error: {args.language_model} reads at most {positions} tokens; lower "
                         f"--max-caption-tokens ({args.max_caption_tokens}) and --max-length "
                         f"({args.max_length})")
    model.to(device)
    if torch.device(device).type == "cuda":
        # TF32 matmuls for the fp32 parts (all of --precision 32): ~fp32 accuracy at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for split in splits.values():
        split.update(captions=tokenize_captions(tokenizer, split["items"], args.max_caption_tokens),
                     references=[item.captions for item in split["items"]], eos=tokenizer.eos_token_id,
                     tokenizer=tokenizer, host_tokens=split["tokens"])
        if args.tokens_on_device:  # 1.7 GB for COCO's train split: batches are then gathered on the GPU
            split["tokens"] = torch.from_numpy(np.ascontiguousarray(split["tokens"][:])).to(device)

    # optimizer, and where a resumed run stands
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=args.precision == "16")
    state = TrainState()
    if checkpoint:
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint["scaler"] and scaler.is_enabled():  # empty when the run so far was not fp16
            scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState.from_checkpoint(checkpoint["state"])
        set_rng_states(checkpoint["rng"][processes.rank])
    # Gradients are averaged over processes during backward; the optimizer then steps identically everywhere.
    train_model = model if processes.world_size == 1 else DistributedDataParallel(
        model, device_ids=[torch.device(device)] if torch.device(device).type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)

    train_captions = sum(len(c) for c in splits["train"]["captions"])
    captions_per_epoch = len(splits["train"]["items"]) if args.one_caption_per_image else train_captions
    effective_batch = args.batch_size * args.accumulate_grad_batches * processes.world_size
    steps_per_epoch = math.ceil(captions_per_epoch / effective_batch)
    total_steps = steps_per_epoch * args.max_epochs
    windows = epoch_windows(splits["train"]["captions"], 0, args, processes.world_size)
    say(f"device {device}, precision {args.precision}, decoder {args.language_model} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), backbone "
        f"{args.vision_backbone}, {model.config.num_image_tokens} image tokens per image")
    say(f"train {len(splits['train']['items'])} images / {train_captions} captions, val "
        f"{len(splits['val']['items'])} images; {captions_per_epoch} captions per epoch")
    say(f"effective batch {args.batch_size} x {args.accumulate_grad_batches} x {processes.world_size} "
        f"process{'es' if processes.world_size > 1 else ''} = {effective_batch} captions; {steps_per_epoch} "
        f"optimizer steps per epoch, {total_steps} in all; peak LR {args.lr:g} ({args.lr_schedule})")
    padding = padding_fraction(windows, splits["train"]["captions"], args.batch_size)
    say(f"padding: {padding:.1%} of the token positions in micro-batches (--bucket-windows "
        f"{args.bucket_windows})")
    say(f"outputs: {args.out_dir}/model.pt (best epoch by val {args.select_by}), checkpoint.pt, log.jsonl; "
        f"embedding cache {args.cache_dir}")
    if checkpoint:
        say(f"resuming at epoch {state.epoch}, step {state.step} ({state.step_in_epoch} into the epoch)")
        if checkpoint["args"].get("precision") != args.precision:
            say(f"note: the run so far trained with --precision {checkpoint['args'].get('precision')}, now "
                f"{args.precision}; the image tokens keep precision {args.embedding_precision}")
        old_epochs = checkpoint["args"].get("max_epochs", args.max_epochs)
        if old_epochs != args.max_epochs and args.lr_schedule == "cosine":
            say(f"note: --max-epochs {old_epochs} -> {args.max_epochs}: the LR schedule is recomputed for "
                f"{total_steps} steps, so at step {state.step} the LR moves from "
                f"{get_lr(state.step, steps_per_epoch * old_epochs, args):.2e} to "
                f"{get_lr(state.step, total_steps, args):.2e} and then decays to the new end")

    # Everything is in place: only now replace an old run (--overwrite) or forget what follows the checkpoint.
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if processes.is_main:
        if args.overwrite and not args.resume:
            for f in RUN_FILES:
                if os.path.exists(os.path.join(args.out_dir, f)):
                    os.remove(os.path.join(args.out_dir, f))
        if checkpoint:
            trim_log(log_path, state)

    def log(record, line):
        if processes.is_main:
            print(line, flush=True)
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save():
        save_checkpoint(checkpoint_path, processes, model, optimizer, scaler, state, tokenizer,
                        run_settings(args))

    # the epoch loop
    with StopRequest(processes) as stop_request:
        for epoch in range(state.epoch, args.max_epochs):
            state.epoch = epoch
            epoch_start = time.time()
            if not train_one_epoch(train_model, optimizer, scaler, splits["train"], epoch, state, total_steps,
                                   args, processes, log, save, stop_request):
                break
            state.epoch, state.step_in_epoch = epoch + 1, 0
            if processes.is_main:  # rank 0 alone evaluates; the others wait for it at the barrier
                scores = validate(model, splits["val"], args, device)
                # ties (0.0 early on, say) go to the lower validation loss
                score = scores[f"val_{args.select_by}"]
                best = (score, -scores["val_loss"]) > (state.best_score, -state.best_val_loss)
                if best:
                    state.best_score, state.best_val_loss = score, scores["val_loss"]
                    save_model(os.path.join(args.out_dir, "model.pt"), model, tokenizer,
                               splits["train"]["preprocessing"],
                               {"epoch": epoch, "step": state.step, "val_bleu4_coco": scores["val_bleu4"],
                                "val_cider_d": scores["val_cider_d"], "val_loss": scores["val_loss"],
                                "beam_size": args.beam_size, "embedding_precision": args.embedding_precision})
                log({"type": "epoch", "epoch": epoch, "step": state.step, **scores, "best": best,
                     "seconds": time.time() - epoch_start},
                    f"epoch {epoch}: val loss {scores['val_loss']:.4f}, BLEU-4 {scores['val_bleu4']:.4f}, "
                    f"CIDEr-D {scores['val_cider_d']:.4f} (beam {args.beam_size})"
                    f"{' (best so far, saved model.pt)' if best else ''}; e.g. {scores['example']!r}")
            processes.barrier()
            save()
            if stop_request.requested():
                break
    if stop_request.signal:
        raise SystemExit(f"error: stopped by {stop_request.signal} at step {state.step}: {checkpoint_path} "
                         f"holds it; --resume continues from there")
    if state.epoch < args.max_epochs:
        say(f"stopped after {args.stop_after_steps} steps; continue with --resume")
        return
    say(f"done: best val {args.select_by} {state.best_score:.4f}; model in {args.out_dir}/model.pt")


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(args, parser)
    signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: a message rather than a silent death
    try:
        main(args)
    except (ArchiveError, DownloadError, OSError, ValueError) as e:  # OSError: a full disk, a missing folder
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(f"error: interrupted before training began or while stopping; nothing is lost: an "
                         f"embedding resumes where it stopped, and --resume continues from "
                         f"{args.out_dir}/checkpoint.pt if it exists") from None
