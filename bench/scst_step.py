"""
The cost of one self-critical micro-batch's log-probabilities and their gradient, two ways, on the same
weights, image tokens and sampled captions:
  one pass  captioner.sample_captions without autograd, then caption_logprobs: one teacher-forced pass over
            the sampled captions, in which only the drawn tokens reach the output layer (what scst.py does);
  loop      the sampler's own step-by-step log-probabilities with autograd on, so that the backward pass runs
            through every decoding step and its KV cache (how scst.py did it before).
Both then run the same backward pass. Prints seconds per micro-batch, the bytes autograd keeps for the
backward pass (on any device), peak GPU memory on CUDA, their ratios, and how far apart the two gradients
are. Random weights by default, or a trained model (--checkpoint: a model folder or an older model.pt),
whose captions end at realistic lengths.

    python bench/scst_step.py --device cuda
    python bench/scst_step.py --device cpu --checkpoint runs/scst/ce/model --images 32 --samples 10
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from captioner import CaptionModel, caption_logprobs, load_model, sample_captions  # noqa: E402
from train_throughput import synthetic_config  # noqa: E402  (bench/, this script's folder, is on sys.path)


def get_args_parser():
    parser = argparse.ArgumentParser("SCST micro-batch: one-pass scoring vs backward through the sampler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", default=None, help="a trained model (default: random weights)")
    parser.add_argument("--images", type=int, default=32, help="images per micro-batch")
    parser.add_argument("--samples", type=int, default=10, help="captions sampled per image")
    parser.add_argument("--max-length", type=int, default=30, help="most tokens per caption")
    parser.add_argument("--repeats", type=int, default=3, help="micro-batches timed per method, after one")
    parser.add_argument("--layers", type=int, default=6, help="random weights: decoder layers (distilgpt2's)")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--image-tokens", type=int, default=10)
    parser.add_argument("--image-width", type=int, default=768)
    return parser


def synchronize(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def one_pass(model, tokens, args, seed):
    generator = torch.Generator().manual_seed(seed)
    ids, _ = sample_captions(model, tokens, args.samples, args.max_length, 1.0, generator)
    logprobs = caption_logprobs(model, tokens.repeat_interleave(args.samples, dim=0), ids, args.max_length)
    return ids, logprobs


def loop(model, tokens, args, seed):
    # the sampler without its torch.no_grad decorator, so that autograd records every step
    return sample_captions.__wrapped__(model, tokens, args.samples, args.max_length, 1.0,
                                       torch.Generator().manual_seed(seed))


def run_once(method, model, tokens, args, seed):
    """-> (seconds, peak GPU memory in GiB or None, GiB saved for the backward pass, the gradient, the ids) of
    one micro-batch."""
    cuda = args.device.startswith("cuda")
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    synchronize(args.device)
    start = time.perf_counter()
    saved = {}  # bytes of the tensors autograd keeps for the backward pass, by storage

    def pack(tensor):
        saved[(tensor.untyped_storage().data_ptr(), tensor.device)] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ids, logprobs = method(model, tokens, args, seed)
    logprobs.sum().backward()  # a policy gradient's backward pass, with unit advantages
    synchronize(args.device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None
    gradient = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    parameters = {(p.untyped_storage().data_ptr(), p.device) for p in model.parameters()}
    saved_gib = sum(n for key, n in saved.items() if key not in parameters) / 2 ** 30  # weights: there anyway
    return seconds, peak, saved_gib, gradient, ids


def main(args):
    torch.manual_seed(0)
    if args.checkpoint:
        model, _, _ = load_model(args.checkpoint)
    else:
        model = CaptionModel(synthetic_config(args))
    model.to(args.device).eval()  # no dropout: both methods score the policy they sampled
    config = model.config
    tokens = torch.randn(args.images, config.num_image_tokens, config.image_width, device=args.device)
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    decoder = model.decoder.config
    print(f"device: {name}; decoder {decoder.n_layer} layers x {decoder.n_embd} "
          f"({args.checkpoint or 'random weights'}); {args.images} images x {args.samples} samples, "
          f"max length {args.max_length}, fp32")
    methods = {"one pass": one_pass, "loop": loop}
    runs = {name: [] for name in methods}
    for repeat in range(args.repeats + 1):  # round 0 warms up; the order alternates, so neither always leads
        for name in (list(methods) if repeat % 2 == 0 else list(methods)[::-1]):
            runs[name].append(run_once(methods[name], model, tokens, args, seed=repeat))
    (*_, one_grad, ids), (*_, loop_grad, loop_ids) = runs["one pass"][-1], runs["loop"][-1]
    assert torch.equal(ids, loop_ids), "the two methods sampled different captions"
    words = int((ids != config.eos_token_id).sum())
    difference = float((one_grad - loop_grad).norm() / loop_grad.norm())
    print(f"captions: {len(ids)}, {words / len(ids):.1f} words on average, padded to {ids.shape[1]} tokens")
    print("| method | s per micro-batch | GiB saved for backward | peak GPU memory (GiB) |")
    print("|---|---|---|---|")
    figures = {}
    for name in methods:
        seconds = sum(r[0] for r in runs[name][1:]) / args.repeats
        (_, peak, saved, *_) = runs[name][-1]
        figures[name] = seconds, saved, peak
        print(f"| {name} | {seconds:.3f} | {saved:.2f} | {'-' if peak is None else f'{peak:.2f}'} |")
    (one_s, one_saved, one_peak), (loop_s, loop_saved, loop_peak) = figures["one pass"], figures["loop"]
    print(f"loop / one pass: {loop_s / one_s:.2f}x the time, {loop_saved / one_saved:.2f}x the memory saved "
          f"for backward" + (f", {loop_peak / one_peak:.2f}x the peak GPU memory" if one_peak else "")
          + f"; gradients differ by {difference:.1e} (relative norm)")

if __name__ == "__main__":
    main(get_args_parser().parse_args())
