"""
Embedding extraction throughput, in three parts so that the bottleneck shows: decoding + preprocessing alone
(support/images.py's ImageFiles in DataLoader workers, no backbone), the backbone alone (one preprocessed
batch, already on the device, run again and again), and both together as train.py runs them
(embed_token_share into a fresh cache). Extraction runs at about the slower of the first two.

    python bench/extract_throughput.py --device cuda --batch-size 256 --num-workers 16   # fp32, fp16, bf16
    python bench/extract_throughput.py --device cpu --backbone efficientnet-lite0 --max-images 256
    python bench/extract_throughput.py --device cuda --random-weights   # blip:base's shape, no download
"""

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root
sys.path.insert(0, ROOT)
from captioner import image_tokens  # noqa: E402
from support.processes import embedding_precision  # noqa: E402
from data import SplitImage, token_encoder  # noqa: E402
from support.backbones import BLIPBackbone, available_backbones, blip_key_map, load_backbone  # noqa: E402
from support.embedding_cache import TokenCache, embed_token_share, prepare_token_cache  # noqa: E402
from support.images import ImageFiles, ImageSource, one_thread  # noqa: E402

IMAGE_TYPES = (".jpg", ".jpeg", ".png")


def get_args_parser():
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser("Embedding extraction throughput")
    default_backbone = "blip:base" if "blip:base" in available_backbones() else "efficientnet-lite0"
    parser.add_argument("--backbone", default=default_backbone,
                        help="a --vision-backbone name (default: blip:base where available, else "
                             "efficientnet-lite0)")
    parser.add_argument("--images", default=os.path.join(ROOT, "..", "shared", "coco-mini"),
                        help="a folder; every .jpg/.jpeg/.png below it is used")
    parser.add_argument("--max-images", type=int, default=512, help="use at most this many images")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--precisions", nargs="+", default=None,
                        help="32, 16 and/or bf16 (default: all three on CUDA, 32 elsewhere, where it is all "
                             "train.py uses)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per backbone call")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count()), help="decoding workers")
    parser.add_argument("--grid", type=int, default=3, help="image tokens per image = 1 + grid x grid")
    parser.add_argument("--backbone-batches", type=int, default=10,
                        help="timed batches of the backbone alone")
    parser.add_argument("--random-weights", action="store_true",
                        help="blip:base only: the same ViT-B/16 with random weights instead of the "
                             "downloaded checkpoint (for machines without network; the speed is the same)")
    return parser


def random_blip_base(folder: str) -> BLIPBackbone:
    """blip:base's architecture with random weights, loaded through the same path as the real checkpoint."""
    from transformers import BlipVisionConfig, BlipVisionModel
    config = BlipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                              num_attention_heads=12, image_size=224, patch_size=16, layer_norm_eps=1e-6)
    lavis_name = {ours: lavis for lavis, ours in blip_key_map(12).items()}
    state = {f"visual_encoder.{lavis_name[k]}": v for k, v in BlipVisionModel(config).state_dict().items()}
    path = os.path.join(folder, "random_blip_base.pth")
    torch.save({"model": state}, path)
    return BLIPBackbone("blip:base", checkpoint=path)


def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(args):
    paths = sorted(os.path.join(folder, f) for folder, _, files in os.walk(args.images) for f in files
                   if f.lower().endswith(IMAGE_TYPES))[:args.max_images]
    if not paths:
        raise SystemExit(f"error: {args.images}: no .jpg/.jpeg/.png images below it")
    items = [SplitImage(i, os.path.basename(path), [], ImageSource(path, path)) for i, path in enumerate(paths)]
    cuda = torch.device(args.device).type == "cuda"
    precisions = args.precisions or (["32", "16", "bf16"] if cuda else ["32"])
    if args.random_weights and args.backbone != "blip:base":
        raise SystemExit("error: --random-weights is for --backbone blip:base")
    with tempfile.TemporaryDirectory() as folder:
        backbone = random_blip_base(folder) if args.random_weights else load_backbone(args.backbone)
    backbone = backbone.to(args.device).eval()
    name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; backbone {args.backbone}{' (random weights)' if args.random_weights else ''} "
          f"({backbone.preprocessing['size']} px, width {backbone.width}); "
          f"{len(items)} images from {os.path.abspath(args.images)}; batch {args.batch_size}, "
          f"{args.num_workers} workers, grid {args.grid}")
    print("| part | precision | images/s | ms per batch |")
    print("|---|---|---|---|")

    def row(part, precision, images, seconds):
        ms_per_batch = 1000 * seconds * args.batch_size / images
        print(f"| {part} | {precision} | {images / seconds:.1f} | {ms_per_batch:.0f} |", flush=True)

    # 1. decoding + preprocessing in workers; the first batch (worker start-up) is not timed
    loader = torch.utils.data.DataLoader(ImageFiles([item.source for item in items], backbone.preprocessing),
                                         batch_size=args.batch_size, num_workers=args.num_workers,
                                         worker_init_fn=one_thread)
    images, start, pixels = 0, None, None
    for _, batch, _ in loader:
        if start is None:
            start, pixels = time.perf_counter(), batch
            continue
        images += len(batch)
    if images:
        row(f"decode + preprocess ({args.num_workers} workers)", "-", images, time.perf_counter() - start)

    # 2. the backbone alone, on one batch already on the device
    pixels = pixels.to(args.device)
    for precision in precisions:
        dtype = torch.float16 if precision == "16" else torch.bfloat16
        autocast = torch.autocast(torch.device(args.device).type, dtype=dtype,
                                  enabled=cuda and precision != "32")
        with autocast:
            for step in range(2 + args.backbone_batches):
                if step == 2:
                    synchronize(args.device)
                    start = time.perf_counter()
                image_tokens(backbone, pixels, args.grid)
        synchronize(args.device)
        row("backbone alone", precision, len(pixels) * args.backbone_batches, time.perf_counter() - start)

    # 3. both, as train.py extracts: workers decode while the backbone runs, tokens stream into the memmap
    for precision in precisions:
        with tempfile.TemporaryDirectory() as cache_dir:
            cache = TokenCache.of(items, "bench", args.backbone, args.grid, cache_dir,
                                  embedding_precision(args.device, precision))
            prepare_token_cache(cache, backbone.width)
            encode = token_encoder(args.grid, args.device, precision)
            start = time.perf_counter()
            embed_token_share(cache, items, backbone, encode, args.device, args.batch_size, args.num_workers)
            row("extraction (embed_token_share)", precision, len(items), time.perf_counter() - start)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
