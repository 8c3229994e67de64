"""
The --serve page's endpoint against the API: photos per second answered by POST /caption (multipart upload,
decoding, captioning under the server's lock, the JSON answer), from one client and from several at once,
against calling Captioner directly on the same photos, one at a time, as the server does.

    python bench/serve_throughput.py --photos 64 --clients 4

The model: EfficientNet-Lite0 (real weights) and a random 2 x 128 GPT-2 decoder with the real tokenizer.
"""

import argparse
import http.client
import os
import sys
import tempfile
import threading
import time
import uuid

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tools")]
from captioner import Captioner, build_model, save_model  # noqa: E402
from make_small_decoder import make_small_decoder  # noqa: E402
from support.images import load_image  # noqa: E402
from support.serve import CaptionServer  # noqa: E402


def get_args_parser():
    parser = argparse.ArgumentParser("The --serve endpoint against the API, photos per second")
    parser.add_argument("--images", default=os.path.join(ROOT, "..", "shared", "coco-mini", "images"))
    parser.add_argument("--photos", type=int, default=64, help="photos sent, each once per method")
    parser.add_argument("--clients", type=int, default=4, help="clients sending at once, in the last method")
    parser.add_argument("--beam-size", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    return parser


def post(port: int, data: bytes, beam: int) -> int:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n'.encode()
            + data + f'\r\n--{boundary}\r\nContent-Disposition: form-data; name="beam"\r\n\r\n{beam}\r\n'
                     f'--{boundary}--\r\n'.encode())
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/caption", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    status = connection.getresponse().status
    connection.close()
    return status


def main(args):
    torch.manual_seed(0)
    paths = [os.path.join(args.images, name) for name in sorted(os.listdir(args.images))[:args.photos]]
    photos = [open(path, "rb").read() for path in paths]
    with tempfile.TemporaryDirectory() as tmp:
        decoder = make_small_decoder(os.path.join(tmp, "decoder"), layers=2, width=128, heads=4)
        model, tokenizer = build_model(decoder, "efficientnet-lite0", image_width=1280, image_grid=3)
        save_model(os.path.join(tmp, "model"), model, tokenizer,
                   {"size": 224, "resize": "squash", "mean": [0.498] * 3, "std": [0.502] * 3})
        captioner = Captioner.from_pretrained(os.path.join(tmp, "model")).to(args.device)
    caption = lambda upload, beam: captioner(load_image(upload), beam)  # noqa: E731 (the CLI's, as served)
    server = CaptionServer(("127.0.0.1", 0), caption)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    print(f"device {args.device} ({os.cpu_count()} cores); {len(photos)} coco-mini photos; beam "
          f"{args.beam_size}; EfficientNet-Lite0 + a 2 x 128 decoder")
    captioner(load_image(paths[0]), args.beam_size)  # warm up both paths
    post(port, photos[0], args.beam_size)
    timings = {}
    start = time.perf_counter()
    for path in paths:
        captioner(load_image(path), args.beam_size)
    timings["Captioner API, one photo at a time"] = time.perf_counter() - start
    start = time.perf_counter()
    assert all(post(port, data, args.beam_size) == 200 for data in photos)
    timings["POST /caption, one client"] = time.perf_counter() - start
    statuses, start = [], time.perf_counter()
    threads = [threading.Thread(target=lambda share: statuses.extend(post(port, d, args.beam_size) for d in share),
                                args=(photos[k::args.clients],)) for k in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    timings[f"POST /caption, {args.clients} clients at once"] = time.perf_counter() - start
    assert statuses == [200] * len(photos)
    server.shutdown()
    api = len(photos) / timings["Captioner API, one photo at a time"]
    print("| method | photos/s | vs the API |")
    print("|---|---|---|")
    for name, seconds in timings.items():
        print(f"| {name} | {len(photos) / seconds:.1f} | {len(photos) / seconds / api:.2f}x |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
