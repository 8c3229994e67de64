"""torchrun: two processes (gloo, CPU) train the same weights as one process with the same effective batch."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import torch

import train
from support.files import safe_torch_load
from conftest import write_dataset
from make_small_decoder import make_small_decoder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def argv(data, decoder, clip, out, cache, batch_size, accumulate):
    return ["--data-dir", data, "--vision-backbone", f"clip:{clip}", "--language-model", decoder,
            "--image-grid", "1", "--out-dir", str(out), "--cache-dir", str(cache), "--one-caption-per-image",
            "--batch-size", str(batch_size), "--accumulate-grad-batches", str(accumulate),
            "--max-epochs", "2", "--lr", "1e-3", "--precision", "32", "--device", "cpu",
            "--log-interval", "1", "--num-workers", "0", "--max-length", "6", "--max-caption-tokens", "12",
            "--checkpoint-every", "0"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_train_what_one_process_trains(tmp_path, tiny_clip_dir):
    # 17 training images, one caption each per epoch, 16 per optimizer step: windows of 16 and 1. With two
    # processes of 4 x 2, each takes 8 of the first window (two micro-batches, one gradient all-reduce) and
    # in the second window rank 1 has nothing and joins the all-reduce with a zero-weight batch.
    data = write_dataset(tmp_path / "data", splits=(("train", 17), ("val", 4), ("test", 2)))
    decoder = make_small_decoder(str(tmp_path / "decoder"), layers=1, width=32, heads=2, positions=32,
                                 dropout=0.0)
    one, two = tmp_path / "one", tmp_path / "two"
    parser = train.get_args_parser()
    args = parser.parse_args(argv(data, decoder, tiny_clip_dir, one, tmp_path / "cache-one", 8, 2))
    train.check_args(args, parser)
    train.main(args)

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "train.py"),
               *argv(data, decoder, tiny_clip_dir, two, tmp_path / "cache-two", 4, 2)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "effective batch 4 x 2 x 2 processes = 16 captions; 2 optimizer steps per epoch" in result.stdout
    assert result.stdout.count("epoch 1: val loss") == 1  # rank 0 alone reports

    # the two processes embedded half of the images each, into the same cache as one process builds
    for split in ("train", "val"):
        [built_one] = glob.glob(str(tmp_path / "cache-one" / f"{split}-*.npy"))
        [built_two] = glob.glob(str(tmp_path / "cache-two" / f"{split}-*.npy"))
        np.testing.assert_array_equal(np.load(built_two), np.load(built_one))

    log_one, log_two = read_log(one), read_log(two)
    assert [r["step"] for r in log_two] == [r["step"] for r in log_one] == [1, 2, 2, 3, 4, 4]
    for a, b in zip(log_one, log_two):
        for key in ("loss", "grad_norm", "val_loss", "val_bleu4"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * max(1.0, abs(a[key])), (key, a, b)
    final_one = safe_torch_load(str(one / "checkpoint.pt"))
    final_two = safe_torch_load(str(two / "checkpoint.pt"))
    assert final_two["state"] == final_one["state"] and len(final_two["rng"]) == 2
    # Summation order differs (two partial gradients, then their sum), and Adam divides by sqrt(v), so
    # weights whose gradient is ~0 can differ by a few 1e-6; a real difference would be of the size of the
    # updates, lr = 1e-3.
    for name, tensor in final_one["model"].items():
        torch.testing.assert_close(final_two["model"][name], tensor, rtol=1e-4, atol=1e-5)
    # and it learned something, so the equality is not that of two models that stood still
    assert log_one[-2]["loss"] < log_one[0]["loss"] - 0.1
