"""
Self-critical sequence training (SCST, Rennie et al. 2017): fine-tune a trained caption model to maximise
CIDEr-D directly, instead of the likelihood of the reference captions.

    python scst.py --checkpoint out/model --out-dir out/scst --data-dir ../shared/coco-mini

Each optimizer step takes a batch of training images, samples --samples-per-image captions per image
(captioner.sample_captions), rewards each with its CIDEr-D against the image's training references (plus
its sentence BLEU-4 x --bleu-weight), and follows the policy gradient of -(reward - baseline) x log p(caption)
(captioner.caption_logprobs). The baseline is the mean reward of the image's other samples (default; "new
self-critical") or that of its greedy caption (--baseline greedy, the paper's). The decoder runs in eval mode,
dropout off: the policy sampled and improved is the one that captions at test time (on coco-mini's val split,
this beat keeping dropout on, as ruotianluo/ImageCaptioning.pytorch does, and it lets one pass sample and
another score). Val CIDEr-D of greedy captions, measured once before training and after every epoch, picks
the model kept in OUT/model (train.py's format).

In reading order: the rewards (CIDEr-D with document frequencies fixed by the training references, in
support/cider.py, plus sentence BLEU-4) and the policy loss, the loop, and main. The optimisation (AdamW,
the LR schedule) is train.py's, imported; the run's machinery (the non-finite guard, checkpoints with exact
--resume, torchrun processes, the log) is support/run.py's, as for train.py.
"""

import argparse
import contextlib
import math
import os
import signal
import time

import numpy as np
import sacrebleu
import torch
import torch.distributed as dist
import torch.nn as nn

from captioner import (ArchiveError, beam_search, caption_image_tokens, caption_logprobs, ids_to_text, load_model,
                       model_from_data, sample_captions, save_model)
from data import training_splits
from evaluate import coco_metrics
from support.cider import CiderD
from support.files import tokenizer_to_data
from support.flags import add_shared_arguments, check_shared_args
from support.processes import Processes, StopRequest, autocast, interrupt, my_share, to_device
from support.run import (Interval, RunFiles, TrainState, check_out_dir, load_checkpoint, optimizer_step,
                         restore, run_processes, run_record, save_checkpoint, seeded_generator, step_done)
from train import get_lr, make_optimizer

# ---------------------------------------------------------------------------------------------------------
# ---- the policy gradient ----

class Policy(nn.Module):
    """The caption model as a sampling policy. forward() samples captions and scores them with autograd, so
    that DistributedDataParallel, which hooks forward, sees one forward and one backward per micro-batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image_tokens, samples_per_image, max_length, temperature, generator):
        """image_tokens (B, K, D) -> ids (B*S, L) and their summed log-probabilities (B*S,), with autograd."""
        S = samples_per_image
        ids, _ = sample_captions(self.model, image_tokens, S, max_length, temperature, generator)
        image_of_caption = image_tokens.repeat_interleave(S, dim=0)  # (B*S, K, D)
        return ids, caption_logprobs(self.model, image_of_caption, ids, max_length, temperature)


def caption_rewards(cider: CiderD, references: list[list[str]], image: int, captions: list[str],
                    bleu_weight: float = 0.0) -> list[float]:
    """The reward of each caption of image `image`: its CIDEr-D, plus bleu_weight x its sentence BLEU-4
    against the image's references (sacrebleu.sentence_bleu, on a 0-1 scale), since CIDEr-D alone lowered
    beam-3 BLEU-4 on coco-mini's val split."""
    scores = cider.scores(image, captions)
    if bleu_weight:
        scores = [score + bleu_weight * sacrebleu.sentence_bleu(caption, references[image]).score / 100
                  for score, caption in zip(scores, captions)]
    return scores


def others_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """rewards (B, S) -> each sample's baseline (B, S): the mean reward of the image's S-1 other samples."""
    S = rewards.shape[1]
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (S - 1)


def policy_loss(logprobs: torch.Tensor, rewards: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """logprobs, rewards, baseline (B, S) -> the SUM over samples of -(reward - baseline) x log p(caption).
    log p is the caption's SUM of token log-probs, and the caller divides by the samples of the whole step,
    so the loss is a mean over samples: each caption carries its whole reward signal, whatever its length
    (this is REINFORCE's estimate of the gradient of the expected reward). A mean over tokens would instead
    give each word of a long caption a smaller push than each word of a short one."""
    return -((rewards - baseline).to(logprobs.device) * logprobs.float()).sum()


def accumulate_policy_gradient(policy, model, window, data, cider, generator, scaler, args, processes):
    """Sample, reward and backward over this process's images of one optimizer step, in micro-batches ->
    (the step's loss over all processes, a tensor; [summed reward, samples, tokens sampled] here)."""
    images, weight = my_share(window, processes.rank, processes.world_size)
    S, device = args.samples_per_image, processes.device
    # The step's loss is the mean over the window's samples on all processes (see policy_loss); DDP averages
    # gradients over processes, which the factor world_size turns back into the sum.
    scale = weight * processes.world_size / (len(window) * S)
    step_loss, tokens, reward_sum = torch.zeros((), device=device), 0, 0.0

    def reward(image, captions):
        return caption_rewards(cider, data["references"], image, captions, args.bleu_weight)

    batches = [images[i:i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    for k, batch in enumerate(batches):
        image_tokens = to_device(torch.from_numpy(np.ascontiguousarray(data["tokens"][batch])), device)
        if args.baseline == "greedy":  # the test-time caption of the current model, as in the paper
            with autocast(device, args.precision):
                greedy, _ = beam_search(model, image_tokens, 1, args.max_length)
            greedy = ids_to_text(data["tokenizer"], greedy)
        last = k == len(batches) - 1  # DDP all-reduces gradients once per step: in the last micro-batch
        with policy.no_sync() if processes.world_size > 1 and not last else contextlib.nullcontext():
            with autocast(device, args.precision):
                ids, logprobs = policy(image_tokens, S, args.max_length, args.temperature, generator)
            texts = ids_to_text(data["tokenizer"], ids)  # (b*S) captions, the samples of an image adjacent
            rewards = torch.tensor([reward(image, texts[i * S:(i + 1) * S])
                                    for i, image in enumerate(batch)])  # (b, S)
            if args.baseline == "others":
                baseline = others_baseline(rewards)
            else:  # (b, 1), broadcast over the samples
                baseline = torch.tensor([reward(image, [greedy[i]]) for i, image in enumerate(batch)])
            loss = policy_loss(logprobs.view(len(batch), S), rewards, baseline) * scale
            scaler.scale(loss).backward()
        step_loss += loss.detach()
        tokens += int((ids != data["eos"]).sum()) + len(ids)  # words and one EOS per caption
        reward_sum += float(rewards.sum()) * (weight > 0)
    if processes.world_size > 1:
        dist.all_reduce(step_loss)  # every process sees the same loss, so all stop together if it is bad
    return step_loss / processes.world_size, [reward_sum, len(images) * S * (weight > 0), tokens * (weight > 0)]


# ---------------------------------------------------------------------------------------------------------
# ---- the loop ----

def train_one_epoch(policy, model, optimizer, scaler, data, cider, epoch, state, total_steps, args, processes,
                    log, save, stop_request) -> bool:
    """The optimizer steps of one epoch from state.step_in_epoch on, as train.train_one_epoch. Returns False
    if the run must stop early (--stop-after-steps, a signal; a checkpoint is saved)."""
    model.eval()  # no dropout: the policy sampled and improved is the one that captions at test time
    # the epoch's optimizer steps: windows of images in an order that is a pure function of (seed, epoch)
    order = torch.randperm(len(data["items"]), generator=seeded_generator("epoch order", args.seed, epoch))
    size = args.batch_size * args.accumulate_grad_batches * processes.world_size
    windows = [order[i:i + size].tolist() for i in range(0, len(order), size)]
    stop_at = state.step + args.stop_after_steps if args.stop_after_steps else None
    interval, totals = Interval(), [0.0, 0, 0]  # this process's summed reward, samples and tokens
    for window_index in range(state.step_in_epoch, len(windows)):
        lr = get_lr(state.step, total_steps, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = seeded_generator("scst samples", args.seed, state.step, processes.rank)
        loss, figures = accumulate_policy_gradient(policy, model, windows[window_index], data, cider, generator,
                                                   scaler, args, processes)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer_step(optimizer, scaler, loss, grad_norm)
        optimizer.zero_grad(set_to_none=True)

        interval.add(loss)
        totals = [a + b for a, b in zip(totals, figures)]
        log_now, checkpoint, stop = step_done(state, window_index, len(windows), args, stop_at, stop_request)
        if log_now:
            reward_sum, samples, tokens = processes.sum(totals)  # of every process
            record = {"type": "train", "step": state.step, "epoch": epoch,
                      **interval.close(state.step, epoch, tokens), "reward": reward_sum / samples, "lr": lr,
                      "grad_norm": float(grad_norm)}
            log(record, f"epoch {epoch} step {state.step}/{total_steps}: reward {record['reward']:.4f} loss "
                        f"{record['loss']:.4f} lr {lr:.2e} grad norm {record['grad_norm']:.2f} "
                        f"{record['ms_per_step']:.0f} ms/step {record['tokens_per_s']:.0f} tokens/s")
            interval, totals = Interval(), [0.0, 0, 0]
        if checkpoint:
            save()
        if stop:
            return False
    return True


def validate(model, data, args, device) -> dict:
    """-> val CIDEr-D and BLEU-4 (COCO protocol) of greedy captions of every val image, and the first one."""
    captions = caption_image_tokens(model, data["tokenizer"], data["tokens"], 1, device, args.eval_batch_size,
                                    args.max_length)
    scores, _ = coco_metrics(captions, data["references"])
    return {"val_cider_d": scores["cider_d"], "val_bleu4": scores["bleu4"], "example": captions[0]}


# ---------------------------------------------------------------------------------------------------------
# ---- main ----

# Settings that a resumed run must share with the run it continues (--max-epochs and --precision may change,
# as in train.py).
RESUME_MUST_MATCH = ("checkpoint", "data_dir", "batch_size", "accumulate_grad_batches", "samples_per_image",
                     "temperature", "baseline", "bleu_weight", "lr", "lr_schedule", "warmup_fraction",
                     "min_lr_ratio", "weight_decay", "grad_clip", "max_length", "seed")


def run_settings(args, start: dict) -> dict:
    """What a checkpoint records: the flags, and what the run needs of the starting model's archive (so that
    --resume does not need that file again)."""
    return {**{k: getattr(args, k) for k in RESUME_MUST_MATCH + ("precision", "max_epochs")}, "start": start}


def starting_model(args, processes):
    """-> (model, tokenizer, start, checkpoint): the model to fine-tune (the checkpoint's when resuming),
    and `start`: the starting archive's preprocessing and embedding precision, which OUT/model keeps."""
    path = os.path.join(args.out_dir, "checkpoint.pt")
    checkpoint = load_checkpoint(path, run_settings(args, {}), RESUME_MUST_MATCH, processes.world_size) \
        if args.resume else None
    start = checkpoint["args"].get("start") if checkpoint else None
    if start is None:  # a new run, or a checkpoint from before "start" was recorded: read the archive
        model, tokenizer, archive = load_model(args.checkpoint)
        start = {"preprocessing": archive["preprocessing"],
                 "embedding_precision": archive["metadata"].get("embedding_precision", "32")}
    if checkpoint:
        model, tokenizer = model_from_data(checkpoint["config"], checkpoint["model"], checkpoint["tokenizer"],
                                           path, "checkpoint")
    return model, tokenizer, start, checkpoint


def end_of_epoch(model, tokenizer, splits, epoch, state, args, device, start, files: RunFiles, began: float):
    """Rank 0: validate; keep the model in OUT/model if it beats the best so far (epoch -1: the start, so
    that it is never worse than the model fine-tuning began with)."""
    scores = validate(model, splits["val"], args, device)
    best = scores["val_cider_d"] > state.best_score
    if best:
        state.best_score = scores["val_cider_d"]
        save_model(os.path.join(args.out_dir, "model"), model, tokenizer, start["preprocessing"],
                   {**run_record(args), "epoch": epoch, "step": state.step, "val_bleu4": scores["val_bleu4"],
                    "val_cider_d": scores["val_cider_d"], "beam_size": 1, "scst_from": args.checkpoint,
                    "embedding_precision": start["embedding_precision"]})
    files.log({"type": "epoch", "epoch": epoch, "step": state.step, **scores, "best": best,
               "seconds": time.time() - began},
              f"epoch {epoch}: val CIDEr-D {scores['val_cider_d']:.4f}, BLEU-4 {scores['val_bleu4']:.4f} "
              f"(greedy){' (best so far, saved model/)' if best else ''}; e.g. {scores['example']!r}")


def describe_run(args, processes, model, splits, state, checkpoint) -> int:
    """Print the run's figures once at start (rank 0) -> the optimizer steps of the whole run."""
    images = len(splits["train"]["items"])
    effective_batch = args.batch_size * args.accumulate_grad_batches * processes.world_size
    total_steps = math.ceil(images / effective_batch) * args.max_epochs
    processes.say(
        f"device {processes.device}, precision {args.precision}, model {args.checkpoint} "
        f"({model.config.vision_backbone}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)"
        f"\ntrain {images} images, val {len(splits['val']['items'])}; effective batch {args.batch_size} x "
        f"{args.accumulate_grad_batches} x {processes.world_size} processes = {effective_batch} images x "
        f"{args.samples_per_image} samples = {effective_batch * args.samples_per_image} captions; "
        f"{total_steps // args.max_epochs} optimizer steps per epoch, {total_steps} in all; peak LR {args.lr:g} "
        f"({args.lr_schedule}); baseline {args.baseline}, temperature {args.temperature:g}\noutputs: "
        f"{args.out_dir}/model (best by val CIDEr-D, greedy), checkpoint.pt, log.jsonl"
        + (f"\nresuming at epoch {state.epoch}, step {state.step} ({state.step_in_epoch} into the epoch)"
           if checkpoint else ""))
    return total_steps


def main(args):
    run_processes(args, fine_tune)


def fine_tune(args, processes: Processes):
    check_out_dir(args)
    files, device = RunFiles(args, processes), processes.device
    model, tokenizer, start, checkpoint = starting_model(args, processes)
    splits = training_splits(args.data_dir, model.config.vision_backbone, model.config.image_grid,
                             args.cache_dir, start["embedding_precision"], args.num_workers, processes,
                             val_share=args.val_share, test_share=args.test_share)
    if splits["train"]["preprocessing"] != start["preprocessing"]:
        raise SystemExit(f"error: the cached embeddings were made with preprocessing "
                         f"{splits['train']['preprocessing']}, the model with {start['preprocessing']}")
    # No seeding: nothing draws random numbers but the sampler, a pure function of seed, step and process
    model.check_max_length(args.max_length)
    model.to(device)
    for split in splits.values():
        split.update(references=[item.captions for item in split["items"]], tokenizer=tokenizer,
                     eos=tokenizer.eos_token_id)
    cider = CiderD(splits["train"]["references"])  # document frequencies of every training reference, once
    optimizer = make_optimizer(model, args.lr, args.weight_decay)
    scaler = torch.amp.GradScaler(torch.device(device).type, enabled=args.precision == "16")
    state = restore(checkpoint, optimizer, scaler, processes) if checkpoint else TrainState()
    train_policy = processes.wrap(Policy(model))  # DistributedDataParallel under torchrun

    total_steps = describe_run(args, processes, model, splits, state, checkpoint)
    files.begin(replace=args.overwrite and not args.resume, resumed_state=state if checkpoint else None)

    def save():
        save_checkpoint(files.checkpoint_path, processes, model, optimizer, scaler, state,
                        tokenizer_to_data(tokenizer), run_settings(args, start))

    def evaluate_epoch(epoch: int, began: float):
        if processes.is_main:
            end_of_epoch(model, tokenizer, splits, epoch, state, args, device, start, files, began)
        processes.barrier()
        save()

    with StopRequest(processes) as stop_request:
        if not checkpoint:  # the start; a run stopped before its first epoch ends does not evaluate it again
            evaluate_epoch(-1, time.time())
        for epoch in range(state.epoch, args.max_epochs):
            state.epoch = epoch
            began = time.time()
            if not train_one_epoch(train_policy, model, optimizer, scaler, splits["train"], cider, epoch,
                                   state, total_steps, args, processes, files.log, save, stop_request):
                break
            state.epoch, state.step_in_epoch = epoch + 1, 0
            evaluate_epoch(epoch, began)
            if stop_request.requested():
                break
    files.end(stop_request, state, args.max_epochs,
              f"done: best val CIDEr-D {state.best_score:.4f}; model in {args.out_dir}/model")


def get_args_parser():
    parser = argparse.ArgumentParser("Fine-tune a caption model with self-critical sequence training")
    add = parser.add_argument
    add("--checkpoint", default="out/model", help="the model to start from (train.py's OUT/model, a Hub id)")
    add("--samples-per-image", type=int, default=20,
        help="captions sampled per image and step (K); on coco-mini's val split 20 beat 10, which beat 5: "
             "less variance in the gradient")
    add("--temperature", type=float, default=1.0, help="sample from softmax(logits / temperature)")
    add("--baseline", choices=["others", "greedy"], default="others",
        help="others: the mean reward of the image's other samples; greedy: the greedy caption's reward")
    add("--bleu-weight", type=float, default=1.0,
        help="reward = CIDEr-D + this x sentence BLEU-4 (0-1) against the image's references; 0: CIDEr-D "
             "alone, which lowered beam-3 BLEU-4 on coco-mini's val split (default %(default)s)")
    # data, optimisation, validation and the run, as train.py, with other defaults (--max-length also limits
    # the sampled captions). SCST wants a small, constant LR; coco-mini's small decoder took 1e-4
    add_shared_arguments(parser)
    parser.set_defaults(max_epochs=3, batch_size=32, lr=5e-5, lr_schedule="constant", weight_decay=0.0,
                        out_dir="out/scst", log_interval=10, checkpoint_every=100)
    return parser


def check_args(args, parser):
    if args.samples_per_image < 1:
        parser.error("--samples-per-image must be at least 1")
    if not args.temperature > 0 or not math.isfinite(args.temperature):
        parser.error(f"--temperature must be > 0 and finite, not {args.temperature}")
    if not args.bleu_weight >= 0 or not math.isfinite(args.bleu_weight):
        parser.error(f"--bleu-weight must be >= 0 and finite, not {args.bleu_weight}")
    if args.max_length < 2:
        parser.error("--max-length must be at least 2 (one word and EOS)")
    if args.baseline == "others" and args.samples_per_image < 2:
        parser.error("--baseline others needs --samples-per-image 2 or more")
    check_shared_args(args, parser)
    args.checkpoint = os.path.abspath(args.checkpoint) if os.path.exists(args.checkpoint) else args.checkpoint
    # the model this run starts from must outlive it: refuse to write over it (or delete it, --overwrite)
    if os.path.realpath(args.checkpoint) in {os.path.realpath(os.path.join(args.out_dir, name)) for name in
                                             ("model", "model.pt", "checkpoint.pt")}:
        parser.error(f"--checkpoint {args.checkpoint} is where this run writes its own model or "
                     f"checkpoint.pt (--out-dir {args.out_dir}); choose another --out-dir")


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    check_args(args, parser)
    signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C: a message rather than a silent death
    try:
        main(args)
    except (ArchiveError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt:
        raise SystemExit(f"error: interrupted; --resume continues from {args.out_dir}/checkpoint.pt if it "
                         f"exists") from None
