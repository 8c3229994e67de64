"""
Decoder training throughput, measured on train.py's own optimizer step (epoch_windows -> make_batch ->
accumulate_gradients -> unscale -> clip -> optimizer_step), with random weights of distilgpt2's shape plus
cross-attention, synthetic image tokens of BLIP base's shape (1 + 3x3 tokens of width 768) and real caption
lengths (the histogram of coco-mini's 14,286 COCO captions under GPT-2 BPE, EOS included: mean 12.9 tokens).

One row per configuration: the original's settings, today's defaults, and each lever on its own.

    python bench/train_throughput.py --device cuda                      # distilgpt2 shape
    python bench/train_throughput.py --device cpu --layers 2 --width 128 --heads 4 --steps 3 --configs default

MFU = 6 x (parameters in matmuls) x tokens/s / peak. Each weight of a matmul costs one multiply-add (2 FLOPs)
per token in the forward pass and two (4 FLOPs) in the backward. "Parameters in matmuls" are the decoder's
linear layers (self-attention, cross-attention queries and output, MLP), the output layer (50,257 x width,
applied at labelled positions only: one per caption token) and the image projection; the embeddings are
lookups, and the cross-attention keys/values see 10 image tokens per caption, not one per token, so they are
counted per image token. Attention scores (T ~ 13 keys) add about 1% and are left out. Peak: the GPU's dense
bf16 tensor-core rate (--peak-tflops; H100/H200 SXM: 989).
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from transformers import GPT2Config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
import train  # noqa: E402
from support.processes import Processes  # noqa: E402
from captioner import CaptionModel, CaptionerConfig  # noqa: E402

KARPATHY_TRAIN_CAPTIONS = 566_747  # train + restval: 113,287 images with 5 or more captions each
# caption length in GPT-2 tokens (EOS included, cut at 40) -> how many of coco-mini's 14,286 captions have it
CAPTION_LENGTHS = {8: 32, 9: 409, 10: 1660, 11: 2436, 12: 2742, 13: 2341, 14: 1747, 15: 1080, 16: 663,
                   17: 414, 18: 252, 19: 155, 20: 105, 21: 61, 22: 58, 23: 30, 24: 22, 25: 14, 26: 14, 27: 18,
                   28: 11, 29: 6, 30: 1, 31: 2, 32: 1, 33: 2, 34: 2, 35: 2, 36: 2, 40: 4}
# name -> (batch, accumulation, precision, bucket windows, tokens on the device, torch.compile)
CONFIGS = {
    "original": (32, 4, "16", 0, False, False),   # --batch-size 32 --accumulate-grad-batches 4 --precision 16
    "128x1-fp16": (128, 1, "16", 0, False, False),  # the levers one at a time, from here
    "128x1-bf16": (128, 1, "bf16", 0, False, False),
    "128x1-bf16-bucketed": (128, 1, "bf16", 50, False, False),
    "default": (128, 1, "bf16", 0, True, False),  # what `python train.py` runs on a GPU with bf16
    "default-bucketed": (128, 1, "bf16", 50, True, False),
    "default-tf32": (128, 1, "32", 0, True, False),
    "default-compiled": (128, 1, "bf16", 0, True, True),
    "512x1": (512, 1, "bf16", 50, True, False),
    "1024x1": (1024, 1, "bf16", 50, True, False),
    "1024x1-compiled": (1024, 1, "bf16", 50, True, True),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0}


def get_args_parser():
    parser = argparse.ArgumentParser("Decoder training throughput")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help=f"of {', '.join(CONFIGS)}")
    parser.add_argument("--layers", type=int, default=6, help="distilgpt2: 6")
    parser.add_argument("--width", type=int, default=768, help="distilgpt2: 768")
    parser.add_argument("--heads", type=int, default=12, help="distilgpt2: 12")
    parser.add_argument("--image-tokens", type=int, default=10, help="1 global + grid x grid")
    parser.add_argument("--image-width", type=int, default=768, help="BLIP base / CLIP ViT-B: 768")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=5,
                        help="untimed steps first (compilation included)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's dense bf16 peak, for MFU (default: from the GPU's name)")
    return parser


def synthetic_config(args) -> CaptionerConfig:
    """A caption model of the sizes in args (--layers, --width, --heads, --image-tokens, --image-width) with
    GPT-2's vocabulary, for random weights; decode_throughput.py uses it too."""
    grid = int(round((args.image_tokens - 1) ** 0.5))
    decoder = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=args.width, n_layer=args.layers,
                         n_head=args.heads, add_cross_attention=True, bos_token_id=50256, eos_token_id=50256)
    return CaptionerConfig(vision_backbone="synthetic", image_grid=grid, image_width=args.image_width,
                           decoder=decoder.to_dict(), eos_token_id=50256)


def matmul_parameters(model: CaptionModel) -> tuple[int, int]:
    """-> (weights applied once per caption token, weights applied once per image token); see the
    docstring."""
    per_token = model.decoder.lm_head.weight.numel()
    per_image_token = model.image_projection.weight.numel()
    for name, module in model.decoder.transformer.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() != 2 or name.endswith(("wte", "wpe")):
            continue
        if name.endswith("crossattention.c_attn"):  # keys and values of the image tokens
            per_image_token += weight.numel()
        else:
            per_token += weight.numel()
    return per_token, per_image_token


def main(args):
    config = synthetic_config(args)
    rng = np.random.default_rng(0)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    lengths, counts = zip(*CAPTION_LENGTHS.items())
    most = max(CONFIGS[c][0] * CONFIGS[c][1] for c in args.configs) * (args.steps + args.warmup_steps)
    n_images = most // 5 + 1
    drawn = rng.choice(lengths, size=(n_images, 5), p=np.array(counts) / sum(counts))
    captions = [[list(rng.integers(0, 50256, n - 1)) + [50256] for n in row] for row in drawn]
    host_tokens = rng.standard_normal((n_images, config.num_image_tokens, args.image_width))
    host_tokens = host_tokens.astype(np.float16)
    print(f"device: {name}; torch {torch.__version__}; decoder {args.layers} layers x {args.width} + "
          f"cross-attention; {config.num_image_tokens} image tokens of width {args.image_width}; "
          f"peak {peak} TFLOP/s (bf16 dense)")
    if cuda:  # as train.py does on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    print("| configuration | batch x accumulation | precision | bucketing | tokens on GPU | compiled "
          "| padding | captions/s | tokens/s | MFU | peak memory (GB) | s per Karpathy epoch | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for config_name in args.configs:
        batch_size, accumulation, precision, buckets, on_device, compiled = CONFIGS[config_name]
        if precision == "16" and not cuda:
            precision = "32"
        torch.manual_seed(0)
        model = CaptionModel(config).to(args.device).train()
        per_token, per_image_token = matmul_parameters(model)
        optimizer = train.make_optimizer(model, 1e-4, 0.01)
        scaler = torch.amp.GradScaler(torch.device(args.device).type, enabled=precision == "16")
        processes = Processes(rank=0, world_size=1, device=args.device)
        step_model = torch.compile(model) if compiled else model
        tokens_source = torch.from_numpy(host_tokens).to(args.device) if on_device else host_tokens
        settings = SimpleNamespace(seed=0, one_caption_per_image=False, batch_size=batch_size,
                                   accumulate_grad_batches=accumulation, bucket_windows=buckets)
        windows = train.epoch_windows(captions, 0, settings)
        padding = train.padding_fraction(windows, captions, batch_size)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        warm_start = time.perf_counter()
        losses, tokens = [], 0
        for step in range(args.warmup_steps + args.steps):
            if step == args.warmup_steps:
                if losses:
                    torch.stack(losses).sum().item()  # wait for the warm-up steps to finish before timing
                start, tokens, losses = time.perf_counter(), 0, []
                warm_seconds = start - warm_start
            window = windows[step]
            batches = [train.make_batch(window[i:i + batch_size], captions, tokens_source, 50256)
                       for i in range(0, len(window), batch_size)]
            loss, window_tokens = train.accumulate_gradients(step_model, batches, scaler, processes,
                                                             precision)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            train.optimizer_step(optimizer, scaler, loss)
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            tokens += window_tokens
        values = torch.stack(losses).tolist()  # the one synchronisation, as train.py logs
        seconds = time.perf_counter() - start
        assert all(np.isfinite(values)), f"loss {values} with {config_name}"
        captions_per_s = args.steps * batch_size * accumulation / seconds
        tokens_per_s = tokens / seconds
        flops = 6 * (per_token * tokens_per_s + per_image_token * captions_per_s * config.num_image_tokens)
        mfu = f"{flops / (peak * 1e12):.1%}" if peak else "n/a"
        memory = f"{torch.cuda.max_memory_allocated() / 1e9:.1f}" if cuda else "n/a"
        print(f"| {config_name} | {batch_size} x {accumulation} | {precision} | {buckets or 'off'} | "
              f"{'yes' if on_device else 'no'} | {'yes' if compiled else 'no'} | {padding:.1%} | "
              f"{captions_per_s:,.0f} | {tokens_per_s:,.0f} | {mfu} | {memory} | "
              f"{KARPATHY_TRAIN_CAPTIONS / captions_per_s:,.0f} | {warm_seconds:.1f} |", flush=True)
        del model, step_model, optimizer, tokens_source


if __name__ == "__main__":
    main(get_args_parser().parse_args())
