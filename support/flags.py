"""The flags that train.py and scst.py share (scst.py sets some other defaults): data, optimisation,
validation decoding, and the run's files, device and logging; their checks, right after parsing.
"""

import math
import os

import torch

from support.embedding_cache import default_cache_dir
from support.processes import default_device
from support.views import VIEWS


def add_shared_arguments(parser):
    """Data, optimisation, validation decoding, and the run (add_run_arguments)."""
    add = parser.add_argument
    add("--data-dir", default="data/coco",
        help="the dataset: Karpathy's dataset_coco.json / dataset_flickr8k.json / dataset_flickr30k.json, or "
             "Hugging Face's imagefolder (metadata.jsonl or metadata.csv), with its images")
    add_share_arguments(parser)
    add("--cache-dir", default=None, help="where image embeddings are cached (default: "
                                          "$XDG_CACHE_HOME/captioner/embeddings or "
                                          "~/.cache/captioner/embeddings)")
    add("--num-workers", type=int, default=min(8, os.cpu_count() or 1),
        help="image decoding workers per process while embedding (default: CPU cores, at most 8)")
    # optimisation
    add("--max-epochs", type=int, default=10, help="passes over the training data (default %(default)s)")
    add("--batch-size", type=int, default=128,
        help="micro-batch size (default %(default)s): captions in train.py (the original: 32), images in "
             "scst.py (each sampled --samples-per-image times)")
    add("--accumulate-grad-batches", type=int, default=1,
        help="micro-batches per optimizer step (effective batch = batch size x this x processes; the "
             "original: 4)")
    add("--lr", type=float, default=1e-4,
        help="peak learning rate (default %(default)s; 1e-4 suits fine-tuning distilgpt2, ~1e-3 a small "
             "decoder trained from scratch; SCST wants less: 1e-4 on coco-mini's small decoder)")
    add("--lr-schedule", choices=["cosine", "constant"], default="cosine",
        help="cosine: linear warmup then cosine decay; constant: a fixed LR, the original's (default "
             "%(default)s)")
    add("--warmup-fraction", type=float, default=0.05, help="share of all steps spent warming up (cosine)")
    add("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr (cosine)")
    add("--weight-decay", type=float, default=0.01,
        help="AdamW decay on weight matrices (default %(default)s)")
    add("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this")
    add("--precision", choices=["auto", "16", "bf16", "32"], default="auto",
        help="16: fp16 autocast + GradScaler (the original; for GPUs without bf16); bf16: bf16 autocast; "
             "32: fp32 (TF32 on CUDA). auto: bf16 on a GPU that has it, else 16 on CUDA, else 32")
    add("--seed", type=int, default=0, help="seeds every RNG and the data order")
    # validation after each epoch
    add("--max-length", type=int, default=30, help="most tokens per decoded caption, EOS included")
    add("--eval-batch-size", type=int, default=128, help="images decoded together")
    add_run_arguments(parser)  # --out-dir, --resume, --overwrite, --device, --log-interval, ...


def add_share_arguments(parser):
    parser.add_argument("--val-share", type=float, default=0.05,
                        help="an imagefolder without splits: the share of images for validation, by a hash of "
                             "each file name (default %(default)s)")
    parser.add_argument("--test-share", type=float, default=0.05,
                        help="... and for the test split (default %(default)s)")


def check_share_args(args, parser):
    if not (0 <= args.val_share < 1 and 0 <= args.test_share < 1 and args.val_share + args.test_share < 1):
        parser.error("--val-share and --test-share must be in [0, 1) and leave images to train on")


def check_shared_args(args, parser):
    """Check the flags of add_shared_arguments; resolve --device, --precision auto and --cache-dir."""
    for name in ("max_epochs", "batch_size", "accumulate_grad_batches", "eval_batch_size", "max_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("num_workers",):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (off) or more")
    for name in ("lr", "weight_decay", "grad_clip", "warmup_fraction", "min_lr_ratio"):
        if not math.isfinite(getattr(args, name)):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, not {getattr(args, name)}")
    if args.lr <= 0 or args.grad_clip <= 0 or args.weight_decay < 0:
        parser.error("--lr and --grad-clip must be > 0, --weight-decay >= 0")
    if not 0 <= args.warmup_fraction < 1 or not 0 <= args.min_lr_ratio <= 1:
        parser.error("--warmup-fraction must be in [0, 1) and --min-lr-ratio in [0, 1] (a negative floor "
                     "would end the run in gradient ascent)")
    check_share_args(args, parser)
    check_run_args(args, parser)  # resolves --device and --precision auto
    args.cache_dir = args.cache_dir or default_cache_dir()
    args.data_dir = os.path.abspath(args.data_dir)


def add_run_arguments(parser):
    """The flags of a run's files, device and logging, which train.py and scst.py share."""
    add = parser.add_argument
    add("--out-dir", default="out",
        help="model/ (the best epoch), checkpoint.pt and log.jsonl go here (default %(default)s)")
    add("--resume", action="store_true", help="continue the run saved in OUT/checkpoint.pt")
    add("--overwrite", action="store_true", help="start over even if OUT holds another run")
    add("--device", default=None, help="cuda, mps or cpu (default: the first available)")
    add("--log-interval", type=int, default=50, help="optimizer steps per log line (default %(default)s)")
    add("--checkpoint-every", type=int, default=500,
        help="also save OUT/checkpoint.pt every N optimizer steps (0: only after each epoch; default "
             "%(default)s)")
    add("--stop-after-steps", type=int, default=0,
        help="save a checkpoint and exit after N optimizer steps of this invocation (0: run to the end); "
             "continue with --resume")


def check_run_args(args, parser):
    """Check the run's flags; resolve --device (default_device()) and --precision auto on it."""
    if args.log_interval < 1:
        parser.error("--log-interval must be at least 1")
    for name in ("checkpoint_every", "stop_after_steps"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be 0 (off) or more")
    args.device = args.device or default_device()
    try:
        cuda = torch.device(args.device).type == "cuda"
    except RuntimeError:
        parser.error(f"--device {args.device}: not a device torch knows (cuda, cuda:N, mps, cpu)")
    if cuda and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA GPU is available here")
    if args.precision == "auto":  # emulated bf16 (T4, V100) is slower than fp16 + GradScaler
        args.precision = ("bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "16") \
            if cuda else "32"
    if args.precision == "16" and not cuda:
        print(f"note: fp16 autocast needs CUDA; on {args.device} training runs in fp32 (--precision 32)")
        args.precision = "32"


def add_overfitting_arguments(parser):
    """train.py's levers against overfitting; docs/recipe.md measures each on coco-mini's val split."""
    add = parser.add_argument
    add("--label-smoothing", type=float, default=0.0,
        help="train towards (1 - eps) on each caption token + eps spread over the vocabulary (Szegedy et al. "
             "2016; BLIP's caption decoder uses 0.1); the logged train loss includes it, the val loss does "
             "not (default %(default)s: off; on coco-mini 0.1 gained nothing beyond seed noise)")
    add("--ema-decay", type=float, default=0.0,
        help="keep an exponential moving average of the weights, with this decay per optimizer step (e.g. "
             "0.999), and validate and save it instead of the raw weights (Polyak averaging; "
             "support/ema.py; default %(default)s: off)")
    add("--dropout", type=float, default=None,
        help="the decoder's dropout on embeddings, residuals and attention weights (GPT-2's resid_pdrop, "
             "embd_pdrop, attn_pdrop; default: the language model's own, 0.1 for GPT-2)")
    add("--image-dropout", type=float, default=0.0,
        help="dropout on the image tokens after their projection, which every cross-attention reads "
             "(default %(default)s)")
    add("--augment-views", type=int, default=0, choices=range(len(VIEWS) + 1), metavar=f"0..{len(VIEWS)}",
        help="embed each training image also in this many fixed views (mirrored, then AlexNet's corner and "
             "centre crops; support/views.py), cached, and pair each caption with one view drawn per epoch; "
             "mirrored views never for captions with left/right (default %(default)s: off)")


def check_overfitting_args(args, parser):
    for name in ("label_smoothing", "ema_decay", "dropout", "image_dropout"):
        value = getattr(args, name)
        if value is not None and not 0 <= value < 1:
            parser.error(f"--{name.replace('_', '-')} must be in [0, 1)")
