"""Captioning a whole folder of photos into a file, as it goes: captioner.py's machinery for
`python captioner.py --checkpoint MODEL photos/`.

Files are found by walking the folders (sorted, so two runs see one order) and are images if PIL can read
them, whatever their name. DataLoader workers decode and preprocess them while the model captions the previous
batch. Each batch's rows are appended to the output (captions.jsonl, or .csv by its extension) and flushed to
disk before the next one, so an interrupted run keeps what it wrote, and running the same command again skips
every file already there: a file is written exactly once. Files that are not images get a row with the error,
are counted and listed at the end, and never stop the run.
"""

import contextlib
import csv
import io
import json
import os
import sys

import torch
from tqdm import tqdm

from support.files import LockedError, file_lock
from support.images import ImageFiles, ImageSource, load_image, one_thread

CSV_COLUMNS = ("file", "caption", "error")


def image_candidates(paths: list[str]) -> list[str]:
    """The files named, and every file below the folders named (recursively, sorted), in order, once each."""
    found = []
    for path in paths:
        if os.path.isdir(path):
            for folder, subfolders, files in os.walk(path):
                subfolders.sort()
                found += [os.path.join(folder, name) for name in sorted(files) if not name.startswith(".")]
        else:
            found.append(path)
    return list(dict.fromkeys(found))


class CaptionsFile:
    """The output: JSON lines {"file", "caption"} (or {"file", "error"}), or CSV with those columns. Reading
    it gives the files already done; a line cut short by a kill is dropped first."""

    def __init__(self, path: str):
        self.path, self.csv = path, path.lower().endswith(".csv")
        self.done = set()
        if os.path.exists(path):
            self.done = self._read_done()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        # file names are written back byte for byte, even those that are not valid UTF-8 (surrogateescape)
        self.file = open(path, "a", encoding="utf-8", errors="surrogateescape", newline="")
        if self.csv and self.file.tell() == 0:
            self.file.write(",".join(CSV_COLUMNS) + "\r\n")

    def _read_done(self) -> set:
        """The files already in the output. Only a captions file is touched: its last line, cut short by a
        kill, is dropped; anything else is refused before a byte of it changes."""
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        try:
            text = complete.decode("utf-8", "surrogateescape")
            rows = list(csv.DictReader(io.StringIO(text, newline=""))) if self.csv else \
                [json.loads(line) for line in text.splitlines() if line.strip()]
            if self.csv and text and text.splitlines()[0].split(",") != list(CSV_COLUMNS) or \
                    not all(isinstance(row, dict) and isinstance(row.get("file"), str) for row in rows):
                raise ValueError("rows without a file")
        except (ValueError, csv.Error) as e:
            raise ValueError(f"{self.path}: not a captions file this program wrote ({e}); choose another "
                             f"--output") from None
        if len(complete) < len(data):
            with open(self.path, "rb+") as f:
                f.truncate(len(complete))
        return {row["file"] for row in rows}

    def write(self, rows: list[dict]):
        """Append rows, then flush them to disk: after this, a kill loses none of them."""
        if self.csv:
            buffer = io.StringIO()
            csv.DictWriter(buffer, CSV_COLUMNS).writerows(rows)
            self.file.write(buffer.getvalue())
        else:
            self.file.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.done.update(row["file"] for row in rows)

    def close(self):
        self.file.close()


def caption_files(paths: list[str], output: str, preprocessing: dict, caption_pixels, batch_size: int = 32,
                  num_workers: int = 2) -> dict:
    """Caption every image among `paths` (files and folders) into `output`; caption_pixels(pixels (b, 3, S,
    S)) -> b captions. -> {"captioned", "skipped" (done before), "not_images": [(file, error)]}."""
    held = contextlib.ExitStack()  # one run per output file; only taking the lock is caught below
    try:
        held.enter_context(file_lock(os.path.abspath(output) + ".lock", output, wait=False))
    except LockedError as e:
        raise ValueError(f"{e}; wait for it to finish or choose another --output") from None
    with held:
        return _caption_files(paths, output, preprocessing, caption_pixels, batch_size, num_workers)


def _caption_files(paths, output, preprocessing, caption_pixels, batch_size, num_workers) -> dict:
    candidates = [path for path in image_candidates(paths)
                  if os.path.abspath(path) not in (os.path.abspath(output), os.path.abspath(output) + ".lock")]
    out = CaptionsFile(output)
    todo = [path for path in candidates if path not in out.done]
    if len(todo) < len(candidates):
        print(f"{output}: {len(candidates) - len(todo)} of {len(candidates)} files were done before; "
              f"captioning the other {len(todo)}", file=sys.stderr)
    loader = torch.utils.data.DataLoader(ImageFiles([ImageSource(p, p) for p in todo], preprocessing),
                                         batch_size=batch_size, num_workers=num_workers,
                                         worker_init_fn=one_thread if num_workers else None)
    not_images, captioned = [], 0
    try:
        with tqdm(total=len(todo), unit="img", desc="captioning", file=sys.stderr) as bar:
            for rows, pixels, errors in loader:
                readable = [k for k, error in enumerate(errors) if not error]
                captions = caption_pixels(pixels[readable]) if readable else []
                written = dict(zip(readable, captions))
                out.write([{"file": todo[int(row)], "caption": written[k]} if k in written else
                           {"file": todo[int(row)], "error": errors[k]} for k, row in enumerate(rows)])
                not_images += [(todo[int(rows[k])], errors[k]) for k in range(len(rows)) if k not in written]
                captioned += len(written)
                bar.update(len(rows))
    finally:
        out.close()
    print(f"{output}: {captioned} images captioned, {len(candidates) - len(todo)} done before"
          + (f"; {len(not_images)} files are not readable images (their rows hold the error), e.g. "
             f"{not_images[0][0]}: {not_images[0][1]}" if not_images else ""), file=sys.stderr)
    return {"captioned": captioned, "skipped": len(candidates) - len(todo), "not_images": not_images}


def print_captions(paths: list[str], caption_images, batch_size: int):
    """A few files: path<TAB>caption on stdout, batch by batch; caption_images(PIL images) -> captions. A file
    that cannot be read is named on stderr and costs the others nothing; then the exit status is 1."""
    unreadable = 0
    for start in range(0, len(paths), batch_size):
        readable, images = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(load_image(path))
                readable.append(path)
            except ValueError as e:
                print(f"error: {e}", file=sys.stderr)
                unreadable += 1
        for path, caption in zip(readable, caption_images(images) if images else []):
            print(f"{path}\t{caption}", flush=True)
    if unreadable:
        raise SystemExit(f"error: {unreadable} of {len(paths)} images could not be read")
