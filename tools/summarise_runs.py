"""Print one line per train.py run: each epoch's val CIDEr-D, the best epoch's val loss, BLEU-4 and CIDEr-D, and
the run's wall-clock seconds (from its log.jsonl).

    python tools/summarise_runs.py runs/levers/*/
"""

import json
import os
import sys


def summarise(run: str) -> str:
    with open(os.path.join(run, "log.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    epochs = [r for r in records if r["type"] == "epoch"]
    if not epochs:
        return f"| {os.path.basename(run.rstrip('/'))} | (no epoch finished) |"
    best = max(epochs, key=lambda r: (r["val_cider_d"], -r["val_loss"]))
    seconds = sum(r["seconds"] for r in epochs)
    per_epoch = " / ".join(f"{r['val_cider_d']:.3f}" for r in epochs)
    return (f"| {os.path.basename(run.rstrip('/'))} | {per_epoch} | {best['epoch']} | {best['val_loss']:.3f} | "
            f"{best['val_bleu4']:.3f} | **{best['val_cider_d']:.3f}** | {min(r['val_loss'] for r in epochs):.3f} "
            f"| {seconds:.0f} |")


if __name__ == "__main__":
    print("| run | val CIDEr-D after each epoch | best epoch | its val loss | its val BLEU-4 | its val CIDEr-D "
          "| lowest val loss | seconds (training + validation) |")
    print("|---|---|---|---|---|---|---|---|")
    for run in sys.argv[1:]:
        print(summarise(run))
