"""
Captioning a folder: `captioner.py MODEL FOLDER` (support/caption_files.py: DataLoader workers decode the next
batch while the model captions this one, rows flushed to captions.jsonl as it goes) against calling the
Python API one list of images at a time on the same files (decoding in the main process, then captioning).
The folder holds coco-mini's photographs plus a few files that are not images and a damaged JPEG.

    python bench/caption_folder.py --images 3000 --num-workers 2

The model: EfficientNet-Lite0 (real weights) and a random 2 x 128 GPT-2 decoder with the real tokenizer
(tools/make_small_decoder.py): the decoding cost is a small model's, the image reading and the backbone real.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from captioner import Captioner, build_model, save_model  # noqa: E402
from make_small_decoder import make_small_decoder  # noqa: E402
from support.caption_files import caption_files  # noqa: E402
from support.images import load_image  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("Captioning a folder: captioner.py's folder mode vs the API, list by list")
    parser.add_argument("--photos", default=os.path.join(ROOT, "..", "shared", "coco-mini", "images"),
                        help="a folder of photographs (default: coco-mini's)")
    parser.add_argument("--images", type=int, default=3000, help="files in the folder, non-images included")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch, both ways")
    parser.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="image reading workers of the folder mode")
    parser.add_argument("--device", default="cpu")
    return parser


def make_folder(photos: str, folder: str, count: int) -> list[str]:
    names = sorted(os.listdir(photos))[:count - 6]
    for k, name in enumerate(names):  # nested, as a photo library is
        os.makedirs(os.path.join(folder, f"album-{k % 10}"), exist_ok=True)
        os.symlink(os.path.abspath(os.path.join(photos, name)), os.path.join(folder, f"album-{k % 10}", name))
    for k in range(5):
        with open(os.path.join(folder, f"notes-{k}.txt"), "w") as f:
            f.write("not a picture\n")
    with open(os.path.join(photos, names[0]), "rb") as f:
        damaged = f.read()
    with open(os.path.join(folder, "damaged.jpg"), "wb") as f:
        f.write(damaged[:len(damaged) // 2])
    return sorted(os.path.join(dirpath, name) for dirpath, _, files in os.walk(folder) for name in files)


def main(args):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        decoder = make_small_decoder(os.path.join(tmp, "decoder"), layers=2, width=128, heads=4)
        model, tokenizer = build_model(decoder, "efficientnet-lite0", image_width=1280, image_grid=3)
        preprocessing = {"size": 224, "resize": "squash", "mean": [0.498] * 3, "std": [0.502] * 3}
        save_model(os.path.join(tmp, "model"), model, tokenizer, preprocessing, {})
        captioner = Captioner.load(os.path.join(tmp, "model")).to(args.device)
        files = make_folder(args.photos, os.path.join(tmp, "photos"), args.images)
        threads = torch.get_num_threads()
        print(f"device {args.device} ({os.cpu_count()} cores, {threads} torch threads); {len(files)} files; "
              f"batch {args.batch_size}; folder mode with {args.num_workers} workers")

        start = time.perf_counter()
        output = os.path.join(tmp, "captions.jsonl")
        result = caption_files([os.path.join(tmp, "photos")], output, captioner.backbone.preprocessing,
                               lambda pixels: captioner.caption_tokens(captioner.encode_pixels(pixels)),
                               args.batch_size, args.num_workers)
        folder_seconds = time.perf_counter() - start
        torch.set_num_threads(threads)  # the DataLoader's workers set their own; the main process keeps its

        start, api_images = time.perf_counter(), 0
        for k in range(0, len(files), args.batch_size):
            images = []
            for path in files[k:k + args.batch_size]:
                try:
                    images.append(load_image(path))
                except ValueError:
                    pass
            api_images += len(captioner(images)) if images else 0
        api_seconds = time.perf_counter() - start
        shutil.rmtree(os.path.join(tmp, "photos"))

    assert api_images == result["captioned"]
    folder_rate, api_rate = result["captioned"] / folder_seconds, api_images / api_seconds
    print("| method | images | seconds | images/s |")
    print("|---|---|---|---|")
    print(f"| captioner.py FOLDER (workers, rows flushed as it goes) | {result['captioned']} | "
          f"{folder_seconds:.1f} | {folder_rate:.1f} |")
    print(f"| Captioner API, one list of {args.batch_size} at a time | {api_images} | {api_seconds:.1f} | "
          f"{api_rate:.1f} |")
    print(f"folder mode / API: {folder_rate / api_rate:.2f}x the images per second; "
          f"{len(result['not_images'])} files were not readable images")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
