"""A training run's machinery, shared by train.py and scst.py: one run per --out-dir, the checkpoint that makes
--resume exact (model, optimizer, scaler, RNG states, the run's settings, all plain data), the JSONL log,
the log interval's timing and its non-finite guard, and the messages that end a run.
"""

import contextlib
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist

from support.files import (ArchiveError, LockedError, atomic_torch_save, atomic_write_text, cpu_state_dict,
                           file_lock, load_versioned, remove_orphans)
from support.processes import Processes, StopRequest

CHECKPOINT_FORMAT = "captioner-checkpoint"
CHECKPOINT_VERSION = 2  # 2: no legacy keys inside; version 1 files are upgraded on reading
RUN_FILES = ("checkpoint.pt", "model", "model.pt", "log.jsonl", "metrics.json", "captions.jsonl", "gallery.html")


def run_record(args) -> dict:
    """What a saved model records of the run that made it (its card shows it): the command and the data."""
    return {"command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]) if sys.argv[0] else "",
            "data_dir": os.path.abspath(args.data_dir)}


def seeded_generator(purpose: str, seed: int, *numbers: int) -> torch.Generator:
    """A CPU generator seeded by a hash of (purpose, seed, numbers...): no two tuples share a stream, as
    seed * 1000 + epoch would, and a resumed run recomputes it from the tuple alone."""
    digest = hashlib.sha256(" ".join(map(str, (purpose, seed, *numbers))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch running (or next to run)
    step_in_epoch: int = 0  # its optimizer steps done
    best_score: float = -1.0  # the validation figure of the epoch kept in OUT/model
    best_val_loss: float = math.inf


# ---------------------------------------------------------------------------------------------------------
# ---- the out dir ----

def check_out_dir(args):
    """Refuse early to overwrite or to resume what is not there."""
    checkpoint_path = os.path.join(args.out_dir, "checkpoint.pt")
    if args.resume and not os.path.isfile(checkpoint_path):
        raise SystemExit(f"error: --resume: {checkpoint_path} does not exist")
    if not args.resume and not args.overwrite and any(os.path.exists(os.path.join(args.out_dir, f))
                                                      for f in RUN_FILES):
        raise SystemExit(f"error: {args.out_dir} already holds a run; pass --resume to continue it, "
                         f"--overwrite to replace it, or choose another --out-dir")


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


def run_processes(args, body):
    """Start this process among torchrun's, hold the out dir (rank 0), run body(args, processes), and
    leave the process group however it ends."""
    processes = Processes.start(args.device)
    try:
        with out_dir_lock(args.out_dir) if processes.is_main else contextlib.nullcontext():
            body(args, processes)
    finally:
        Processes.stop()


# ---------------------------------------------------------------------------------------------------------
# ---- checkpoints ----

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


def save_checkpoint(path, processes, model, optimizer, scaler, state, tokenizer_data: dict, settings: dict,
                    extra: dict | None = None):
    """Called by every process (each contributes its RNG state); rank 0 writes `path`. `settings`: plain
    data that load_checkpoint compares on resume; `extra`: more entries (train.py's weight average)."""
    model = getattr(model, "module", model)  # the model inside DistributedDataParallel
    states = [rng_states()]
    if processes.world_size > 1:
        states = [None] * processes.world_size
        dist.all_gather_object(states, rng_states())
    if not processes.is_main:
        return
    checkpoint = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "model": cpu_state_dict(model),
                  "config": asdict(model.config), "tokenizer": tokenizer_data,
                  "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "state": asdict(state),
                  "rng": states,  # one per process
                  "args": {**settings, "world_size": processes.world_size}, **(extra or {})}
    atomic_torch_save(checkpoint, path)


# How version-1 runs ran, for the settings they did not record yet
VERSION_1_DEFAULTS = {"bucket_windows": 0, "select_by": "bleu4", "world_size": 1}
# Settings added in version 2, as the runs before them ran
LATER_DEFAULTS = {"label_smoothing": 0.0, "ema_decay": 0.0, "dropout": None, "image_dropout": 0.0,
                  "augment_views": 0}


def upgrade_checkpoint(checkpoint: dict) -> dict:
    """A version-1 checkpoint as version 2: settings added since default to how those runs ran, and the
    best score has its current name."""
    if checkpoint["version"] == 1:
        state = dict(checkpoint["state"])
        if "best_bleu4" in state:  # before --select-by
            state["best_score"] = state.pop("best_bleu4")
        checkpoint = {**checkpoint, "version": 2, "state": state,
                      "args": {**VERSION_1_DEFAULTS, **checkpoint["args"]}}
    return checkpoint


def load_checkpoint(path: str, settings: dict, must_match, world_size: int) -> dict:
    """Read a checkpoint; refuse it, naming the flags, if it was written with other `must_match` settings."""
    checkpoint = load_versioned(path, CHECKPOINT_FORMAT, (1, CHECKPOINT_VERSION))
    needed = {"model", "config", "tokenizer", "optimizer", "scaler", "state", "rng", "args"}
    missing = needed - set(checkpoint)
    if missing:
        raise ArchiveError(f"{path}: damaged checkpoint: no {', '.join(sorted(missing))}")
    checkpoint = upgrade_checkpoint(checkpoint)
    saved = {**LATER_DEFAULTS, **checkpoint["args"]}
    different = {k: (saved.get(k), settings[k]) for k in must_match if saved.get(k) != settings[k]}
    if saved["world_size"] != world_size:
        different["nproc-per-node"] = (saved["world_size"], world_size)
    if different:
        raise SystemExit(f"error: {path} was written with other settings; resume with the same ones: " +
                         ", ".join(f"--{k.replace('_', '-')} {old!r} (now {new!r})"
                                   for k, (old, new) in different.items()))
    return checkpoint


def restore(checkpoint: dict, optimizer, scaler, processes) -> TrainState:
    """Put a resumed run's optimizer, fp16 scaler and this process's RNG states back -> where the run stands."""
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint["scaler"] and scaler.is_enabled():  # empty when the run so far was not fp16
        scaler.load_state_dict(checkpoint["scaler"])
    set_rng_states(checkpoint["rng"][processes.rank])
    return TrainState(**checkpoint["state"])


def step_done(state: TrainState, window_index: int, windows: int, args, stop_at, stop_request):
    """Count the optimizer step just taken -> (log now, save a checkpoint now, stop now): a log line every
    --log-interval steps and at the epoch's end, a checkpoint every --checkpoint-every steps and before any
    stop (--stop-after-steps, a signal)."""
    state.step += 1
    state.step_in_epoch = window_index + 1
    stop = (stop_at is not None and state.step >= stop_at) or stop_request.requested()
    checkpoint = bool(stop or (args.checkpoint_every and state.step % args.checkpoint_every == 0))
    return checkpoint or state.step % args.log_interval == 0 or window_index == windows - 1, checkpoint, stop


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


def padding_fraction(windows, captions, batch_size: int) -> float:
    """Share of the token positions in the epoch's micro-batches that are padding."""
    padded = real = 0
    for window in windows:
        for i in range(0, len(window), batch_size):
            lengths = [len(captions[a][b]) for a, b in window[i:i + batch_size]]
            padded, real = padded + max(lengths) * len(lengths), real + sum(lengths)
    return 1 - real / padded


# ---------------------------------------------------------------------------------------------------------
# ---- the log ----

class Interval:
    """The steps since the last log line. Their losses stay on the device until `close`, the one host
    synchronisation of the interval on a single process, which also stops the run if one of them was not
    finite."""

    def __init__(self):
        self.losses, self.start = [], time.time()

    def add(self, loss):
        self.losses.append(loss)

    def close(self, step: int, epoch: int, tokens: int) -> dict:
        """-> mean loss, ms/step and tokens/s (`tokens`: of all processes) of the interval, which ends at
        optimizer step `step`."""
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
                "tokens_per_s": tokens / seconds}


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


def describe_run(args, processes, model, splits, state, checkpoint, captions_per_epoch: int,
                 steps_per_epoch: int, padding: float, get_lr):
    """train.py's figures, printed once at start (rank 0). padding: the share of padded token positions in
    this epoch's micro-batches; get_lr(step, total_steps, args): the LR schedule."""
    say, train_captions = processes.say, sum(len(c) for c in splits["train"]["captions"])
    total_steps = steps_per_epoch * args.max_epochs
    say(f"device {processes.device}, precision {args.precision}, decoder {args.language_model} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters), backbone "
        f"{args.vision_backbone}, {model.config.num_image_tokens} image tokens per image")
    say(f"train {len(splits['train']['items'])} images / {train_captions} captions, val "
        f"{len(splits['val']['items'])} images; {captions_per_epoch} captions per epoch")
    say(f"effective batch {args.batch_size} x {args.accumulate_grad_batches} x {processes.world_size} "
        f"process{'es' if processes.world_size > 1 else ''} = "
        f"{args.batch_size * args.accumulate_grad_batches * processes.world_size} captions; {steps_per_epoch} "
        f"optimizer steps per epoch, {total_steps} in all; peak LR {args.lr:g} ({args.lr_schedule})")
    say(f"padding: {padding:.1%} of the token positions in epoch {state.epoch}'s micro-batches "
        f"(--bucket-windows {args.bucket_windows})")
    say(f"against overfitting: label smoothing {args.label_smoothing:g}, EMA decay {args.ema_decay:g}, dropout "
        f"{model.decoder.config.resid_pdrop:g}, image dropout {args.image_dropout:g}, {args.augment_views} views")
    say(f"outputs: {args.out_dir}/model (best epoch by val {args.select_by}), checkpoint.pt, log.jsonl; "
        f"embedding cache {args.cache_dir}")
    if checkpoint:  # a resumed run may change --max-epochs: the LR at this step, old schedule and new
        old_total = steps_per_epoch * checkpoint["args"].get("max_epochs", args.max_epochs)
        lrs = get_lr(state.step, old_total, args), get_lr(state.step, total_steps, args)
        describe_resume(processes, checkpoint, args, state, total_steps, lrs)


def describe_resume(processes, checkpoint, args, state, total_steps: int, lrs: tuple[float, float]):
    """Where a resumed run stands, and what changed since (lrs: the LR at this step before and after a new
    --max-epochs)."""
    say, before = processes.say, checkpoint["args"]
    say(f"resuming at epoch {state.epoch}, step {state.step} ({state.step_in_epoch} into the epoch)")
    if before.get("precision") != args.precision:
        say(f"note: the run so far trained with --precision {before.get('precision')}, now {args.precision}; "
            f"the image tokens keep precision {args.embedding_precision}")
    old_epochs = before.get("max_epochs", args.max_epochs)
    if old_epochs != args.max_epochs and args.lr_schedule == "cosine":
        say(f"note: --max-epochs {old_epochs} -> {args.max_epochs}: the LR schedule is recomputed for "
            f"{total_steps} steps, so at step {state.step} the LR moves from {lrs[0]:.2e} to {lrs[1]:.2e} and "
            f"then decays to the new end")


class RunFiles:
    """A run's files in --out-dir as rank 0 sees them: log.jsonl and checkpoint.pt."""

    def __init__(self, args, processes: Processes):
        self.out_dir, self.processes = args.out_dir, processes
        self.checkpoint_path = os.path.join(args.out_dir, "checkpoint.pt")
        self.log_path = os.path.join(args.out_dir, "log.jsonl")

    def begin(self, replace: bool, resumed_state: TrainState | None):
        """Once everything is built: only now replace an old run (--overwrite), or forget what follows the
        checkpoint of a resumed one."""
        if not self.processes.is_main:
            return
        if replace:
            for name in RUN_FILES:
                path = os.path.join(self.out_dir, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                elif os.path.lexists(path):
                    os.remove(path)
        if resumed_state is not None:
            trim_log(self.log_path, resumed_state)

    def log(self, record: dict, line: str):
        """Print a line and append its record to log.jsonl (rank 0)."""
        if self.processes.is_main:
            print(line, flush=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def end(self, stop_request: StopRequest, state: TrainState, max_epochs: int, done: str):
        """The run's last line: why it stopped, or `done`."""
        if stop_request.signal:
            raise SystemExit(f"error: stopped by {stop_request.signal} at step {state.step}: "
                             f"{self.checkpoint_path} holds it; --resume continues from there")
        if state.epoch < max_epochs:
            self.processes.say(f"stopped at step {state.step} (--stop-after-steps); continue with --resume")
        else:
            self.processes.say(done)
