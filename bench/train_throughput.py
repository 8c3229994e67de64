"""
Decoder training throughput per precision, measured on train.py's own optimizer step
(accumulate_gradients -> unscale -> clip -> AdamW step -> scaler update), with random weights of
distilgpt2's shape, synthetic image tokens of BLIP base's shape (1 + 3x3 tokens of width 768) and
COCO-length captions (8-20 tokens, EOS included).

    python bench/train_throughput.py --device cuda                      # distilgpt2 shape
    python bench/train_throughput.py --device cpu --layers 2 --width 128 --heads 4 --steps 3
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
from transformers import GPT2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import train  # noqa: E402
from captioner import CaptionModel, CaptionerConfig

KARPATHY_TRAIN_CAPTIONS = 566_747  # about that many: train + restval, 113,287 images with 5 or more each


def get_args_parser():
    parser = argparse.ArgumentParser("Decoder training throughput")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precisions", nargs="+", default=["32", "bf16", "16"], help="32, bf16 and/or 16")
    parser.add_argument("--layers", type=int, default=6, help="distilgpt2: 6")
    parser.add_argument("--width", type=int, default=768, help="distilgpt2: 768")
    parser.add_argument("--heads", type=int, default=12, help="distilgpt2: 12")
    parser.add_argument("--image-tokens", type=int, default=10, help="1 global + grid x grid")
    parser.add_argument("--image-width", type=int, default=768, help="BLIP base / CLIP ViT-B: 768")
    parser.add_argument("--batches", nargs="+", default=["32x4", "128x1"],
                        help="micro-batch x accumulation pairs to time (the same effective batch, split differently)")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first")
    return parser


def synthetic_config(args) -> CaptionerConfig:
    """A caption model of the sizes in args (--layers, --width, --heads, --image-tokens, --image-width) with
    GPT-2's vocabulary, for random weights; decode_throughput.py uses it too."""
    grid = int(round((args.image_tokens - 1) ** 0.5))
    decoder = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=args.width, n_layer=args.layers,
                         n_head=args.heads, add_cross_attention=True, bos_token_id=50256, eos_token_id=50256)
    return CaptionerConfig(vision_backbone="synthetic", image_grid=grid, image_width=args.image_width,
                           decoder=decoder.to_dict(), eos_token_id=50256)


def main(args):
    config = synthetic_config(args)
    rng = np.random.default_rng(0)
    pairs = [tuple(int(x) for x in b.split("x")) for b in args.batches]
    n_captions = max(b * a for b, a in pairs) * (args.steps + args.warmup_steps)
    captions = [[list(rng.integers(0, 50256, rng.integers(7, 20))) + [50256]] for _ in range(n_captions)]
    image_tokens = rng.standard_normal((n_captions, config.num_image_tokens, args.image_width)).astype(np.float16)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}; decoder {args.layers} layers x {args.width}; {config.num_image_tokens} image tokens of "
          f"width {args.image_width}")
    if args.device.startswith("cuda"):  # as train.py does on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print("| batch x accumulation | precision | ms/step | captions/s | tokens/s | peak GPU memory (GB) | "
          "minutes per Karpathy epoch |")
    print("|---|---|---|---|---|---|---|")
    for (batch_size, accumulation), precision in [(p, q) for p in pairs for q in args.precisions]:
        torch.manual_seed(0)
        model = CaptionModel(config).to(args.device).train()
        optimizer = train.make_optimizer(model, 1e-4, 0.01)
        scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=precision == "16")
        run = train.Processes(rank=0, world_size=1, device=args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        tokens = 0
        for step in range(args.warmup_steps + args.steps):
            if step == args.warmup_steps:
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start, tokens = time.perf_counter(), 0
            first = step * batch_size * accumulation
            batches = [train.make_batch([(first + m * batch_size + i, 0) for i in range(batch_size)],
                                        captions, image_tokens, 50256)
                       for m in range(accumulation)]
            loss, window_tokens = train.accumulate_gradients(model, batches, scaler, run, precision)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            tokens += window_tokens
        assert torch.isfinite(loss), f"loss {loss} in precision {precision}"
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        captions_per_s = args.steps * batch_size * accumulation / seconds
        memory = torch.cuda.max_memory_allocated() / 1e9 if args.device.startswith("cuda") else float("nan")
        print(f"| {batch_size} x {accumulation} | {precision} | {1000 * seconds / args.steps:.0f} | {captions_per_s:.0f} | {tokens / seconds:.0f} | "
              f"{memory:.1f} | {KARPATHY_TRAIN_CAPTIONS / captions_per_s / 60:.1f} |", flush=True)
        del model, optimizer


if __name__ == "__main__":
    main(get_args_parser().parse_args())
