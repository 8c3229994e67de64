"""
Decoding throughput for beam sizes 1-4, three ways on the same weights and image tokens:
  ours      captioner.beam_search: all images x beams in one batch per step, KV cache reordered by parent;
  uncached  the same search one image at a time, re-running the whole prefix every step (the original's way);
  generate  transformers' generate(num_beams=k) on the decoder, batched, with its own cache.
Random weights of distilgpt2's shape (by default), so captions run to --max-length: every method does the same
number of steps. Prints images/s and ratios measured side by side in one run.

    python bench/decode_throughput.py --device cuda
    python bench/decode_throughput.py --device cpu --images 8 --layers 2 --width 256 --heads 4
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from captioner import CaptionModel, beam_search  # noqa: E402
from train_throughput import synthetic_config  # noqa: E402  (bench/, this script's folder, is on sys.path)


class PrefixHistory:
    """A stand-in for the KV cache that only remembers the tokens, so every step re-runs the whole prefix."""

    def __init__(self, ids):
        self.ids = ids

    def reorder_cache(self, index):
        self.ids = self.ids[index]


class UncachedModel(torch.nn.Module):
    """The caption model with decode_step recomputing the full prefix each step (no KV cache)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.eos_token_id = model, model.eos_token_id

    def encode_images(self, image_tokens):
        return self.model.encode_images(image_tokens)

    def decode_step(self, input_ids, memory, history):
        ids = input_ids if history is None else torch.cat([history.ids, input_ids], dim=1)
        logits = self.model.decoder(input_ids=ids, encoder_hidden_states=memory, use_cache=False).logits
        return logits[:, -1], PrefixHistory(ids)


def get_args_parser():
    parser = argparse.ArgumentParser("Decoding throughput: batched cached beam search vs alternatives")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=64, help="images decoded (one batch for ours/generate)")
    parser.add_argument("--uncached-images", type=int, default=None,
                        help="images for the slow per-image search (default: all; its rate is per image)")
    parser.add_argument("--beam-sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--max-length", type=int, default=20, help="tokens per caption")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--image-tokens", type=int, default=10)
    parser.add_argument("--image-width", type=int, default=768)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    return parser


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


@torch.no_grad()
def main(args):
    config = synthetic_config(args)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = CaptionModel(config).to(args.device, dtype).eval()
    with torch.no_grad():  # keep EOS out of reach so that every method decodes exactly max_length tokens:
        model.decoder.transformer.ln_f.weight[0] = 0.0  # feature 0 of every final hidden state is
        model.decoder.transformer.ln_f.bias[0] = 10.0  # the constant 10 ...
        model.decoder.lm_head.weight[50256] = 0.0  # (tied: also EOS's input embedding, only the start token)
        model.decoder.lm_head.weight[50256, 0] = -10.0  # ... which EOS's logit weighs at -10: -100
    tokens = torch.randn(args.images, config.num_image_tokens, args.image_width, device=args.device,
                         dtype=dtype)
    n_uncached = args.uncached_images or args.images
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device: {name}, {args.dtype}; decoder {args.layers} layers x {args.width}; {args.images} images, "
          f"{args.max_length} tokens each (uncached search on {n_uncached} images)")
    beam_search(model, tokens[:2], 2, 3)  # warm up kernels
    print("| beam | ours (images/s) | uncached per image (images/s) | generate (images/s) "
          "| ours / uncached | ours / generate | same captions as uncached |")
    print("|---|---|---|---|---|---|---|")
    for k in args.beam_sizes:
        (ours_ids, _), ours_s = timed(lambda: beam_search(model, tokens, k, args.max_length), args.device)
        uncached = UncachedModel(model)
        results, slow_s = timed(lambda: [beam_search(uncached, tokens[i:i + 1], k, args.max_length)
                                         for i in range(n_uncached)], args.device)
        same = all(torch.equal(ours_ids[i], ids[0]) for i, (ids, _) in enumerate(results))
        # a caption that ended early would make ours look faster than generate, which is held to max_length
        early = ours_ids.shape[1] < args.max_length - 1 or (ours_ids[:, :args.max_length - 1] == 50256).any()
        assert not early, "a caption ended early: the comparison would not be like for like"
        start_ids = torch.full((args.images, 1), 50256, device=args.device)
        memory = model.encode_images(tokens)
        _, generate_s = timed(lambda: model.decoder.generate(
            input_ids=start_ids, attention_mask=torch.ones_like(start_ids), encoder_hidden_states=memory,
            num_beams=k, do_sample=False, max_new_tokens=args.max_length, min_new_tokens=args.max_length,
            pad_token_id=50256, length_penalty=1.0), args.device)
        ours_rate, slow_rate, gen_rate = args.images / ours_s, n_uncached / slow_s, args.images / generate_s
        print(f"| {k} | {ours_rate:.1f} | {slow_rate:.1f} | {gen_rate:.1f} | {ours_rate / slow_rate:.1f}x | "
              f"{ours_rate / gen_rate:.1f}x | {same} |", flush=True)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
