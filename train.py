"""
Train a caption decoder on frozen image embeddings.

    python train.py --data-dir data/coco                                  # BLIP base + distilgpt2, on COCO
    python train.py --data-dir ../shared/coco-mini --vision-backbone efficientnet-lite0 \\
        --language-model runs/small-decoder --lr 1e-3                     # offline, on a CPU (see tools/)

data.py provides the captions and the backbone's image tokens (cached on disk); this file runs a hand-rolled
loop: autocast (bf16, fp16 + GradScaler, or fp32), gradient accumulation whose gradient equals the one big
batch, AdamW with warmup + cosine, clipping. After every epoch it measures the validation loss, BLEU-4 and
CIDEr-D (real decoding) and keeps the best epoch in OUT/model/ (a model folder); the full training state goes to
OUT/checkpoint.pt, so that --resume continues exactly where the run stopped (support/run.py).

In reading order: batches, optimisation, train_one_epoch, validation, the flags, and main, whose train()
is the setup and then the epoch loop.

Several GPUs: `torchrun --nproc_per_node=N train.py ...` runs DistributedDataParallel; every optimizer step
then sees batch size x accumulation x N captions, and rank 0 alone logs, evaluates and writes files.
"""

import argparse
import contextlib
import math
import os
import random
import signal
import time

import numpy as np
import torch
import torch.distributed as dist

from captioner import (ArchiveError, build_model, caption_image_tokens, labelled_positions, model_from_data,
                       save_model)
from data import DownloadError, add_captions, training_splits
from evaluate import coco_metrics
from support.backbones import check_backbone_name
from support.files import tokenizer_to_data
from support.flags import (add_overfitting_arguments, add_shared_arguments, check_overfitting_args,
                           check_shared_args)
from support.processes import (Processes, StopRequest, autocast, embedding_precision, interrupt, my_share,
                               to_device)
from support.run import (Interval, RunFiles, TrainState, check_out_dir, describe_run, load_checkpoint,
                         optimizer_step, padding_fraction, restore, run_processes, run_record, save_checkpoint,
                         seeded_generator, step_done)
from support.ema import WeightAverage
from support.views import draw_views, tokens_to_device

# ---------------------------------------------------------------------------------------------------------
# ---- batches ----

def epoch_order(captions, epoch: int, seed: int, one_caption_per_image: bool) -> list[tuple[int, int]]:
    """(image, caption) pairs of one epoch, shuffled by a generator seeded from (seed, epoch) alone, so the
    order can be recomputed on resume."""
    generator = seeded_generator("epoch order", seed, epoch)
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


def make_batch(pairs, captions, image_tokens, eos: int, train_padding: bool = False, views=None):
    """-> image tokens (B, K, D) float16, input_ids (B, T), labels (B, T) with -100 on padding.
    Each sequence is EOS + caption + EOS; inputs drop the last token, labels drop the first.
    With views (B,), the view of each pair's image (0: plain; see --augment-views), image_tokens holds every
    view: a list of (N, K, D) arrays, or one (views + 1, N, K, D) tensor on the device."""
    sequences = [[eos] + captions[i][j] for i, j in pairs]
    T = max(len(s) for s in sequences) - 1
    input_ids = torch.full((len(pairs), T), eos, dtype=torch.long)
    labels = torch.full((len(pairs), T), eos if train_padding else -100, dtype=torch.long)
    for row, s in enumerate(sequences):
        input_ids[row, : len(s) - 1] = torch.tensor(s[:-1])
        labels[row, : len(s) - 1] = torch.tensor(s[1:])
    index = [i for i, _ in pairs]
    if views is not None:
        if torch.is_tensor(image_tokens):
            rows, views = (to_device(torch.tensor(x), image_tokens.device) for x in (index, views))
            return image_tokens[views, rows], input_ids, labels  # (B, K, D)
        rows = np.stack([image_tokens[v][i] for i, v in zip(index, views)])  # (B, K, D)
        return torch.from_numpy(rows), input_ids, labels
    if torch.is_tensor(image_tokens):  # the split's tokens are on the GPU: gather there; only indices travel
        rows = to_device(torch.tensor(index), image_tokens.device)
        return image_tokens.index_select(0, rows), input_ids, labels
    return torch.from_numpy(np.ascontiguousarray(image_tokens[index])), input_ids, labels  # (B, K, D) fp16


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


def epoch_size(train_split, args, world_size: int) -> tuple[int, int]:
    """-> (captions an epoch sees, optimizer steps per epoch)."""
    captions = (len(train_split["items"]) if args.one_caption_per_image
                else sum(len(c) for c in train_split["captions"]))
    return captions, math.ceil(captions / (args.batch_size * args.accumulate_grad_batches * world_size))


def make_optimizer(model, lr: float, weight_decay: float):
    # Decay matrices only; biases, LayerNorms and the image-slot embedding are not decayed (as in nanoGPT).
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "slot" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.dim() < 2 or "slot" in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters, and it can skip a step on the device (see optimizer_step)
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused)


def accumulate_gradients(model, batches, scaler, processes: Processes, precision: str, weight: float = 1.0,
                         label_smoothing: float = 0.0):
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
                _, loss_sum = model(image_tokens, input_ids, positions, targets, label_smoothing)
            loss = loss_sum * scale
            scaler.scale(loss).backward()
        window_loss += loss.detach()
    if processes.world_size > 1:
        dist.all_reduce(window_loss)  # every process sees the same loss, so all stop together if it is bad
    return window_loss / processes.world_size, window_tokens


def train_one_epoch(model, optimizer, scaler, data, epoch, state, total_steps, args, processes, log, save,
                    stop_request, average=None) -> bool:
    """Run the optimizer steps of one epoch from state.step_in_epoch on; save() writes a checkpoint; the
    weight average, if any, follows every step. Returns False if the run must stop early (--stop-after-steps,
    a signal; a checkpoint is saved), True when the epoch is complete."""
    model.train()
    windows = epoch_windows(data["captions"], epoch, args, processes.world_size)
    tokens, view_of = data["tokens"], None
    if args.augment_views:  # one view per caption, drawn afresh each epoch from (seed, epoch)
        tokens = data["all_views"]
        view_of = draw_views(data["captions"], data["mirror_ok"], args.augment_views, epoch, args.seed)
    stop_at = state.step + args.stop_after_steps if args.stop_after_steps else None
    interval, interval_tokens = Interval(), 0
    for window_index in range(state.step_in_epoch, len(windows)):
        lr = get_lr(state.step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine, weight = my_share(windows[window_index], processes.rank, processes.world_size)
        batches = [make_batch(pairs, data["captions"], tokens, data["eos"], args.train_padding,
                              None if view_of is None else [view_of[i][j] for i, j in pairs])
                   for pairs in (mine[k:k + args.batch_size] for k in range(0, len(mine), args.batch_size))]
        loss, window_tokens = accumulate_gradients(model, batches, scaler, processes, args.precision, weight,
                                                   args.label_smoothing)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer_step(optimizer, scaler, loss, grad_norm)
        optimizer.zero_grad(set_to_none=True)
        if average:
            average.update()

        interval.add(loss)
        interval_tokens += window_tokens  # of all processes
        log_now, checkpoint, stop = step_done(state, window_index, len(windows), args, stop_at, stop_request)
        if log_now:
            record = {"type": "train", "step": state.step, "epoch": epoch,
                      **interval.close(state.step, epoch, interval_tokens), "lr": lr,
                      "grad_norm": float(grad_norm)}
            log(record, f"epoch {epoch} step {state.step}/{total_steps}: loss {record['loss']:.4f} "
                        f"lr {lr:.2e} grad norm {record['grad_norm']:.2f} {record['ms_per_step']:.0f} "
                        f"ms/step {record['tokens_per_s']:.0f} tokens/s")
            interval, interval_tokens = Interval(), 0
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
# ---- flags ----

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
        help="the validation figure (COCO protocol) that picks the epoch kept in OUT/model")
    add_overfitting_arguments(parser)  # label smoothing, EMA, augmented views, dropout: docs/recipe.md
    return parser


MAX_IMAGE_GRID = 16  # 257 image tokens; the backbones' patch grids are 7 x 7 to 24 x 24


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
    check_overfitting_args(args, parser)
    if not 0 <= args.image_grid <= MAX_IMAGE_GRID:
        parser.error(f"--image-grid must be in [0, {MAX_IMAGE_GRID}] (1 + grid x grid image tokens per "
                     f"image)")
    check_shared_args(args, parser)
    if args.tokens_on_device is None:
        args.tokens_on_device = torch.device(args.device).type == "cuda"


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

# Settings that a resumed run must share with the run it continues. Others may change: --max-epochs (the LR
# schedule is then recomputed for the new length), --precision (the image tokens keep the run's precision).
RESUME_MUST_MATCH = ("vision_backbone", "image_grid", "language_model", "batch_size",
                     "accumulate_grad_batches", "seed", "one_caption_per_image", "train_padding",
                     "max_caption_tokens", "data_dir", "lr", "lr_schedule", "warmup_fraction", "min_lr_ratio",
                     "weight_decay", "grad_clip", "beam_size", "max_length", "bucket_windows", "select_by",
                     "label_smoothing", "ema_decay", "dropout", "image_dropout", "augment_views")


def run_settings(args) -> dict:
    """What a checkpoint records of the run's flags."""
    return {k: getattr(args, k) for k in RESUME_MUST_MATCH + ("precision", "max_epochs", "embedding_precision")}


def setup_model(args, processes, checkpoint, image_width: int):
    """-> (model on the device, tokenizer): the checkpoint's when resuming, else a new model around the
    pretrained LM. Seeded after the cache: loading a backbone to build it draws random numbers (weight
    init), and whether that happened must not change the decoder's initialisation or the dropout masks."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # also seeds every CUDA device
    if checkpoint is None:
        model, tokenizer = build_model(args.language_model, args.vision_backbone, image_width, args.image_grid,
                                       args.dropout, args.image_dropout)
    else:
        model, tokenizer = model_from_data(checkpoint["config"], checkpoint["model"], checkpoint["tokenizer"],
                                           os.path.join(args.out_dir, "checkpoint.pt"), "checkpoint")
    torch.manual_seed(args.seed + processes.rank)  # the same weights everywhere, each its own dropout masks
    positions = model.decoder.config.n_positions
    if max(args.max_caption_tokens, args.max_length) > positions:
        raise SystemExit(f"error: {args.language_model} reads at most {positions} tokens; lower "
                         f"--max-caption-tokens ({args.max_caption_tokens}) and --max-length "
                         f"({args.max_length})")
    if torch.device(processes.device).type == "cuda":
        # TF32 matmuls for the fp32 parts (all of --precision 32): ~fp32 accuracy at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return model.to(processes.device), tokenizer


def end_of_epoch(model, tokenizer, splits, epoch, state, args, device, files: RunFiles, start: float):
    """Rank 0: validate, keep the model in OUT/model if it is the best so far, log the epoch. With
    --ema-decay, `model` holds the weight average here."""
    scores = validate(model, splits["val"], args, device)
    score = scores[f"val_{args.select_by}"]
    best = (score, -scores["val_loss"]) > (state.best_score, -state.best_val_loss)  # ties: lower val loss
    if best:
        state.best_score, state.best_val_loss = score, scores["val_loss"]
        save_model(os.path.join(args.out_dir, "model"), model, tokenizer, splits["train"]["preprocessing"],
                   {**run_record(args), "epoch": epoch, "step": state.step, "val_bleu4": scores["val_bleu4"],
                    "val_cider_d": scores["val_cider_d"], "val_loss": scores["val_loss"],
                    "beam_size": args.beam_size, "embedding_precision": args.embedding_precision})
    files.log({"type": "epoch", "epoch": epoch, "step": state.step, **scores, "best": best,
               "seconds": time.time() - start},
              f"epoch {epoch}: val loss {scores['val_loss']:.4f}, BLEU-4 {scores['val_bleu4']:.4f}, CIDEr-D "
              f"{scores['val_cider_d']:.4f} (beam {args.beam_size})"
              f"{' (best so far, saved model/)' if best else ''}; e.g. {scores['example']!r}")


def main(args):
    run_processes(args, train)


def train(args, processes: Processes):
    check_out_dir(args)
    files = RunFiles(args, processes)
    # image tokens keep the precision the run started with, whatever --precision a resumed run gives
    args.embedding_precision = embedding_precision(processes.device, args.precision)
    checkpoint = None
    if args.resume:
        checkpoint = load_checkpoint(files.checkpoint_path, run_settings(args), RESUME_MUST_MATCH,
                                     processes.world_size)
        args.embedding_precision = checkpoint["args"].get("embedding_precision", "32")

    splits = training_splits(args.data_dir, args.vision_backbone, args.image_grid, args.cache_dir,
                             args.embedding_precision, args.num_workers, processes, args.download,
                             args.val_share, args.test_share, args.augment_views)
    model, tokenizer = setup_model(args, processes, checkpoint, splits["train"]["tokens"].shape[2])
    add_captions(splits, tokenizer, args.max_caption_tokens)
    if args.tokens_on_device:  # 1.7 GB for COCO's train split (per view): batches are then gathered on the GPU
        tokens_to_device(splits, processes.device)
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(torch.device(processes.device).type, enabled=args.precision == "16")
    state = restore(checkpoint, optimizer, scaler, processes) if checkpoint else TrainState()
    average = WeightAverage(model, args.ema_decay) if args.ema_decay else None
    if average and checkpoint:
        average.load_state_dict(checkpoint["ema"])
    # Gradients are averaged over processes during backward; the optimizer then steps identically everywhere.
    train_model = processes.wrap(model)
    if args.compile:
        train_model = torch.compile(train_model)
    captions_per_epoch, steps_per_epoch = epoch_size(splits["train"], args, processes.world_size)
    total_steps = steps_per_epoch * args.max_epochs
    windows = epoch_windows(splits["train"]["captions"], state.epoch, args, processes.world_size)
    padding = padding_fraction(windows, splits["train"]["captions"], args.batch_size)
    describe_run(args, processes, model, splits, state, checkpoint, captions_per_epoch, steps_per_epoch,
                 padding, get_lr)
    files.begin(replace=args.overwrite and not args.resume, resumed_state=state if checkpoint else None)

    def save():
        save_checkpoint(files.checkpoint_path, processes, model, optimizer, scaler, state,
                        tokenizer_to_data(tokenizer), run_settings(args),
                        {"ema": average.state_dict()} if average else {})

    # the epoch loop
    with StopRequest(processes) as stop_request:
        for epoch in range(state.epoch, args.max_epochs):
            state.epoch = epoch
            epoch_start = time.time()
            if not train_one_epoch(train_model, optimizer, scaler, splits["train"], epoch, state, total_steps,
                                   args, processes, files.log, save, stop_request, average):
                break
            state.epoch, state.step_in_epoch = epoch + 1, 0
            if processes.is_main:  # rank 0 alone evaluates; the others wait for it at the barrier
                with average.swapped_in() if average else contextlib.nullcontext():
                    end_of_epoch(model, tokenizer, splits, epoch, state, args, processes.device, files,
                                 epoch_start)
            processes.barrier()
            save()
            if stop_request.requested():
                break
    files.end(stop_request, state, args.max_epochs,
              f"done: best val {args.select_by} {state.best_score:.4f}; model in {args.out_dir}/model")


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
