"""What a hostile user tried, case by case: bad datasets, bad images, bad flags, bad model files, two runs at
once, signals, a full or read-only disk. Each case asserts the outcome: the exit code, the one-line message
(never a traceback), and what is left on disk. `python -m pytest tests/test_faults.py -q -rA` reads as the
table."""
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import data
import support.embedding_cache as embedding_cache
import train
from captioner import ArchiveError, build_model, load_backbone, load_image, load_model, save_model
from support.files import file_lock
from conftest import read_log, run_train, train_argv, write_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": REPO}


def script(name, *argv, timeout=120, **popen):
    """Run one of the project's scripts -> CompletedProcess; it must never show a Python traceback."""
    result = subprocess.run([sys.executable, os.path.join(REPO, name), *map(str, argv)], capture_output=True,
                            text=True, env=ENV, timeout=timeout, **popen)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr[-3000:]
    return result


def last_error(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert lines, result.stderr[-2000:]
    return lines[-1]


def edit_dataset(root, change):
    path = os.path.join(root, "dataset_coco.json")
    with open(path) as f:
        dataset = json.load(f)
    change(dataset["images"])
    with open(path, "w") as f:
        json.dump(dataset, f)


@pytest.fixture
def run(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path):
    """run(*extra) -> train.py's argv for the tiny dataset, writing to tmp_path/out with its cache in
    tmp_path/cache."""
    return lambda *extra: train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out",
                                     tmp_path / "cache", *extra)


# ---- bad datasets ----

def test_val_image_without_captions_is_left_out_and_the_epoch_is_kept(run, tiny_dataset, tmp_path):
    edit_dataset(tiny_dataset, lambda images: images[16].update(sentences=[]))  # the first val image
    result = script("train.py", *run("--max-epochs", "1"))
    assert result.returncode == 0
    assert "1 val images have no caption and are left out (cocoids [16])" in result.stdout
    assert os.path.isdir(tmp_path / "out" / "model")
    assert os.path.isfile(tmp_path / "out" / "checkpoint.pt")
    evaluated = script("evaluate.py", "--checkpoint", tmp_path / "out" / "model",
                       "--data-dir", tiny_dataset, "--split", "val", "--cache-dir", tmp_path / "cache",
                       "--device", "cpu", "--num-workers", "0", "--gallery", "0")
    assert evaluated.returncode == 0
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["images"] == 3


def test_empty_captions_duplicates_and_images_in_both_splits_are_warned_about(run, tiny_dataset):
    def change(images):
        images[0]["sentences"].append({"raw": "  "})
        images[17].update(filename=images[1]["filename"], filepath=images[1]["filepath"])  # val repeats train
        images[18].update(filename=images[19]["filename"])  # two val entries, one picture
    edit_dataset(tiny_dataset, change)
    result = script("train.py", *run("--max-epochs", "1"))
    assert result.returncode == 0
    assert "1 empty train captions are left out" in result.stdout
    assert "1 val entries name an image listed before; each is merged into the first, captions united" \
        in result.stdout
    assert "1 images are in both the train and the val split" in result.stdout


@pytest.mark.parametrize("filepath, filename", [("..", "outside.jpg"), ("images/../..", "outside.jpg"),
                                                ("/etc", "passwd"), ("", "/etc/passwd")])
def test_paths_outside_the_data_folder_are_refused(run, tiny_dataset, filepath, filename, tmp_path):
    edit_dataset(tiny_dataset, lambda images: images[2].update(filepath=filepath, filename=filename))
    result = script("train.py", *run())
    assert result.returncode == 1
    assert last_error(result).endswith(f"which is not inside {tiny_dataset}; refusing to read it")
    assert not os.path.exists(tmp_path / "cache")  # refused before anything was embedded


def test_symbolic_links_the_owner_made_are_followed_and_nul_bytes_refused(tiny_dataset, tmp_path):
    os.rename(os.path.join(tiny_dataset, "images"), tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", os.path.join(tiny_dataset, "images"))  # images -> /datasets/..., say
    assert len(data.read_split(tiny_dataset, "train")) == 16
    edit_dataset(tiny_dataset, lambda images: images[2].update(filename="a\0b.jpg"))
    with pytest.raises(ValueError, match="images\\[2\\] names 'images/a\\\\x00b.jpg', which is not inside"):
        data.read_split(tiny_dataset, "train")


def test_a_fifo_is_listed_as_unreadable_instead_of_hanging_the_run(run, tiny_dataset, tmp_path):
    fifo = os.path.join(tiny_dataset, "images", "000000000003.jpg")
    os.remove(fifo)
    os.mkfifo(fifo)
    result = script("train.py", *run("--max-epochs", "1"), timeout=120)
    assert result.returncode == 0
    listed = json.load(open(next(p for p in (tmp_path / "cache").iterdir()
                                 if p.name.endswith(".unreadable.json") and p.name.startswith("train"))))
    assert [(r["cocoid"], r["error"]) for r in listed] == [(3, f"ValueError: {fifo}: cannot read this image "
                                                               f"(not a regular file)")]


# ---- bad images ----

def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    Image.new("1", (8000, 6000)).save(tmp_path / "bomb.png")  # a few KB on disk, 48M pixels
    assert os.path.getsize(tmp_path / "bomb.png") < 200_000
    with pytest.raises(ValueError, match="8000 x 6000 pixels, more than the 40,000,000 this program decodes"):
        load_image(tmp_path / "bomb.png")


def test_one_bad_image_costs_the_cli_nothing_but_its_own_caption(small_decoder_dir, tiny_clip_dir,
                                                                  tiny_dataset, tmp_path):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=1)
    save_model(str(tmp_path / "model"), model, tokenizer, backbone.preprocessing)
    good = [os.path.join(tiny_dataset, "images", f"{i:012d}.jpg") for i in range(3)]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really")
    result = script("captioner.py", "--checkpoint", tmp_path / "model", "--max-length", "4",
                    "--batch-size", "2", good[0], tmp_path / "bad.jpg", good[1], good[2])
    assert result.returncode == 1
    # every line is path<TAB>caption
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == good
    assert f"{tmp_path / 'bad.jpg'}: cannot read this image" in result.stderr
    assert last_error(result) == "error: 1 of 4 images could not be read"


def test_the_cli_keeps_stdout_for_captions_with_efficientnet(small_decoder_dir, tiny_dataset, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    model, tokenizer = build_model(small_decoder_dir, "efficientnet-lite0", image_width=1280, image_grid=1)
    preprocessing = load_backbone("efficientnet-lite0").preprocessing
    save_model(str(tmp_path / "model"), model, tokenizer, preprocessing)
    image = os.path.join(tiny_dataset, "images", "000000000000.jpg")
    result = script("captioner.py", "--checkpoint", tmp_path / "model", "--max-length", "4", image)
    assert result.returncode == 0
    assert result.stdout.startswith(f"{image}\t") and len(result.stdout.splitlines()) == 1


# ---- bad flags ----

@pytest.mark.parametrize("argv, message", [
    (["--min-lr-ratio", "-5"], "--min-lr-ratio in [0, 1]"),
    (["--lr", "nan"], "--lr must be a finite number, not nan"),
    (["--lr", "inf"], "--lr must be a finite number, not inf"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, not nan"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be 0 (off) or more"),
    (["--stop-after-steps", "-1"], "--stop-after-steps must be 0 (off) or more"),
    (["--image-grid", "100"], "--image-grid must be in [0, 16]"),
])
def test_harmful_flags_are_refused_at_parsing(argv, message, capsys):
    parser = train.get_args_parser()
    with pytest.raises(SystemExit) as stop:
        train.check_args(parser.parse_args(["--vision-backbone", "efficientnet-lite0", *argv]), parser)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_a_grid_finer_than_the_backbone_is_refused(run, tmp_path):
    argv = run()
    argv[argv.index("--image-grid") + 1] = "5"  # the tiny CLIP has a 4 x 4 patch grid
    result = script("train.py", *argv)
    assert result.returncode == 1 and "--image-grid 5 is finer than" in last_error(result)


def test_a_missing_language_model_folder_is_named(run, tmp_path):
    argv = run()
    argv[argv.index("--language-model") + 1] = str(tmp_path / "no-such-model")
    result = script("train.py", *argv)
    assert result.returncode == 1
    assert last_error(result).startswith(f"error: {tmp_path / 'no-such-model'}: "
                                        f"cannot load this language model")


# ---- hostile model files ----

def test_a_pickled_payload_is_refused_and_never_runs(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"echo PWNED > {tmp_path / 'marker'}",))
    with open(tmp_path / "model.pt", "wb") as f:
        pickle.dump({"format": "captioner-model", "version": 1, "config": Payload()}, f)
    result = script("captioner.py", "--checkpoint", tmp_path / "model.pt", "x.jpg")
    assert result.returncode == 1 and "not a readable PyTorch file" in last_error(result)
    assert not os.path.exists(tmp_path / "marker")


def test_a_small_file_asking_for_a_huge_model_is_rejected_cheaply(small_decoder_dir, tmp_path):
    model, tokenizer = build_model(small_decoder_dir, "test", image_width=4, image_grid=0)
    save_model(str(tmp_path / "huge"), model, tokenizer, {"size": 32})
    with open(tmp_path / "huge" / "config.json") as f:
        description = json.load(f)
    description["config"]["decoder"].update(n_layer=200, n_embd=8192, n_head=64)  # ~160B parameters
    (tmp_path / "huge" / "config.json").write_text(json.dumps(description))
    start = time.time()
    with pytest.raises(ArchiveError, match="huge: damaged model archive: .*do not fit its config"):
        load_model(str(tmp_path / "huge"))
    assert time.time() - start < 10  # building it for real would take an hour and 640 GB


# ---- two runs at once ----

def test_a_second_run_on_the_same_out_dir_is_refused_at_once(run, tmp_path):
    os.makedirs(tmp_path / "out")
    with file_lock(str(tmp_path / "out" / ".lock"), "test"):  # as a first run holds it
        result = script("train.py", *run())
    assert result.returncode == 1
    assert f"is in use by process {os.getpid()}" in last_error(result)
    assert os.listdir(tmp_path / "out") == [".lock"] and not os.path.exists(tmp_path / "cache")


def test_a_second_run_on_the_same_cache_waits_then_reuses_it(run, tiny_dataset, tiny_clip_dir, tmp_path):
    items = data.read_split(tiny_dataset, "train")
    name = f"clip:{tiny_clip_dir}"
    cache = embedding_cache.TokenCache.of(items, "train", name, 2, str(tmp_path / "cache"))
    os.makedirs(tmp_path / "cache")
    with file_lock(cache.path(".lock"), "test"):  # as a first run building the train cache
        second = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *run("--max-epochs", "1")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
        waiting = ""
        while "waiting for" not in waiting:
            waiting += second.stdout.readline()
            assert second.poll() is None, second.stderr.read()
        # meanwhile the first run builds and publishes the cache (here: in this process)
        embedding_cache.build_token_cache(cache, items, data.token_encoder(2, "cpu", "32"),
                                          lambda: load_backbone(name), "cpu", 32, 0, 0, 1, lambda: None)
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert f"waiting for process {os.getpid()}" in waiting
    assert "embedding train images" not in err  # reused what the first run built
    assert os.path.isdir(tmp_path / "out" / "model")


# ---- signals, kills, disks ----

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_saves_a_checkpoint_at_the_step_and_resume_goes_on(run, tmp_path, signum):
    argv = run("--max-epochs", "40")
    process = subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), *argv],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    while "step 2/" not in process.stdout.readline():  # training is under way
        assert process.poll() is None, process.stderr.read()
    process.send_signal(signum)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1 and "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("error:")][-1]
    step = int(message.split(" at step ")[1].split(":")[0])
    assert message == (f"error: stopped by {signal.Signals(signum).name} at step {step}: {tmp_path / 'out'}/"
                       f"checkpoint.pt holds it; --resume continues from there")
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert checkpoint["state"]["step"] == step == max(r["step"] for r in read_log(tmp_path / "out"))
    result = script("train.py", *argv[:argv.index("--max-epochs")], "--max-epochs", "1", *argv[argv.index(
        "--max-epochs") + 2:], "--resume", "--stop-after-steps", "1")
    assert result.returncode == 0
    assert f"resuming at epoch {checkpoint['state']['epoch']}, step {step}" in result.stdout


def test_orphan_temporary_files_from_a_killed_save_are_removed(run, tmp_path):
    run_train(run("--max-epochs", "1", "--stop-after-steps", "1"))
    orphan = tmp_path / "out" / ".checkpoint.pt.tmp-abc123"
    orphan.write_bytes(b"\0" * 1000)  # what kill -9 during atomic_torch_save leaves
    run_train(run("--max-epochs", "1", "--resume", "--stop-after-steps", "1"))
    assert not orphan.exists()


def test_a_full_disk_keeps_the_last_checkpoint_whole(run, tmp_path, monkeypatch):
    run_train(run("--max-epochs", "1", "--stop-after-steps", "1"))
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()

    def full(obj, f, *args, **kwargs):
        f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left on device"):
        run_train(run("--max-epochs", "1", "--resume", "--stop-after-steps", "1"))
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before
    assert [f for f in os.listdir(tmp_path / "out") if "tmp" in f] == []


def make_read_only(folder, monkeypatch):
    """Every os.open below `folder` fails as on a read-only file system (root ignores chmod)."""
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(folder)):
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), path)
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)


def test_a_read_only_out_dir_is_found_before_anything_is_built(run, tmp_path, monkeypatch):
    make_read_only(tmp_path / "out", monkeypatch)
    with pytest.raises(SystemExit,
                       match="out: cannot write here \\(Read-only file system\\); choose another"):
        run_train(run())
    assert not os.path.exists(tmp_path / "cache")


def test_a_read_only_cache_dir_is_named(run, tiny_dataset, tiny_clip_dir, tmp_path, monkeypatch):
    make_read_only(tmp_path / "cache", monkeypatch)
    with pytest.raises(OSError,
                       match="cache: cannot write the embedding cache here \\(Read-only file system\\)"):
        data.cached_image_tokens(data.read_split(tiny_dataset, "val"), "val", f"clip:{tiny_clip_dir}", 2,
                                 str(tmp_path / "cache"), num_workers=0)


def test_same_size_damage_to_a_published_cache_is_detected(tiny_dataset, tiny_clip_dir, tmp_path, capsys):
    items = data.read_split(tiny_dataset, "val")
    name = f"clip:{tiny_clip_dir}"
    tokens = np.array(data.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)[0])
    cache = embedding_cache.TokenCache.of(items, "val", name, 2, str(tmp_path))
    with open(cache.path(".npy"), "r+b") as f:  # NaN bytes over one token, the file's size unchanged
        f.seek(-64, os.SEEK_END)
        f.write(np.full(32, np.nan, dtype=np.float16).tobytes())
    rebuilt, _ = data.cached_image_tokens(items, "val", name, 2, str(tmp_path), num_workers=0)
    assert "does not match its description; rebuilding it" in capsys.readouterr().out
    assert np.isfinite(rebuilt).all() and np.array_equal(rebuilt, tokens)


# ---- kill -9 at chosen points (the patch runs inside the child, before train.py's main) ----

def kill_at(patch: str, argv) -> subprocess.CompletedProcess:
    """Run train.py in a child that SIGKILLs itself where `patch` (Python run first) says."""
    code = ("import os, signal, sys, runpy\n" + patch +
            f"\nsys.argv = ['train.py'] + {list(map(str, argv))!r}\n"
            f"runpy.run_path({os.path.join(REPO, 'train.py')!r}, run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                            timeout=180, cwd=REPO)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    return result


def test_kill_9_while_saving_a_checkpoint_keeps_the_previous_one(run, tmp_path):
    argv = run("--checkpoint-every", "1", "--max-epochs", "1")
    # the second save dies after writing its temporary file, before renaming it over checkpoint.pt
    kill_at("import captioner\nreal, saves = os.replace, []\n"
            "def replace(src, dst):\n"
            "    saves.append(dst) if dst.endswith('checkpoint.pt') else None\n"
            "    if len(saves) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    real(src, dst)\n"
            "os.replace = replace", argv)
    out = tmp_path / "out"
    assert [f for f in os.listdir(out) if ".tmp-" in f]  # the killed save's leftover
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 1
    result = script("train.py", *argv, "--resume")
    assert result.returncode == 0 and "resuming at epoch 0, step 1" in result.stdout
    assert not [f for f in os.listdir(out) if ".tmp-" in f]
    assert [r["step"] for r in read_log(out) if r["type"] == "train"] == [1, 2, 3]


def test_kill_9_while_training_resumes_from_the_last_checkpoint(run, tmp_path):
    argv = run("--checkpoint-every", "2", "--max-epochs", "1")
    # 3 micro-batches a step: the 7th forward is in step 3
    kill_at("import captioner\nreal = captioner.CaptionModel.forward\ncalls = []\n"
            "def dying(*a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 7: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(*a, **k)\n"
            "captioner.CaptionModel.forward = dying", argv)
    out = tmp_path / "out"
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"] == 2
    result = script("train.py", *argv, "--resume")
    assert result.returncode == 0 and "resuming at epoch 0, step 2" in result.stdout
    assert [r["step"] for r in read_log(out) if r["type"] == "train"] == [1, 2, 3]


def test_kill_9_while_embedding_is_resumed_to_the_same_tokens(run, tiny_dataset, tiny_clip_dir, tmp_path):
    argv = run("--max-epochs", "1")
    kill_at("import support.backbones as backbones\nreal = backbones.CLIPBackbone.features\ncalls = []\n"
            "def dying(self, *a, **k):\n"
            "    calls.append(1)\n"
            "    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
            "    return real(self, *a, **k)\n"
            "backbones.CLIPBackbone.features = dying", argv)
    assert any(p.name.endswith(".partial.npy") for p in (tmp_path / "cache").iterdir())
    assert script("train.py", *argv).returncode == 0
    items = data.read_split(tiny_dataset, "train")
    resumed, _ = data.cached_image_tokens(items, "train", f"clip:{tiny_clip_dir}", 2, str(tmp_path / "cache"))
    clean, _ = data.cached_image_tokens(items, "train", f"clip:{tiny_clip_dir}", 2, str(tmp_path / "clean"),
                                        num_workers=0)
    np.testing.assert_array_equal(resumed, clean)


# ---- the second probe: SCST's own input, decoding's memory and positions, invalid Unicode ----

FIXTURES = os.path.join(REPO, "tests", "fixtures")


@pytest.mark.parametrize("name", ["model", "model.pt"])  # today's folder, and an earlier release's file
@pytest.mark.parametrize("flags", [["--overwrite"], ["--resume"], []])
def test_scst_never_writes_over_the_model_it_starts_from(tmp_path, flags, name):
    out = tmp_path / "run"
    out.mkdir()
    start = out / name
    if name == "model":
        model, tokenizer, archive = load_model(os.path.join(FIXTURES, "legacy-model.pt"))
        save_model(str(start), model, tokenizer, archive["preprocessing"], archive["metadata"])
    else:
        start.write_bytes(open(os.path.join(FIXTURES, "legacy-model.pt"), "rb").read())
    before = {f: open(os.path.join(dirpath, f), "rb").read() for dirpath, _, files in os.walk(out) for f in files}
    os.symlink(out, tmp_path / "alias")  # the same folder under another name is caught too
    for out_dir in (out, tmp_path / "alias"):
        result = script("scst.py", "--checkpoint", start, "--out-dir", out_dir, "--device", "cpu", *flags)
        assert result.returncode == 2
        assert "is where this run writes its own model or checkpoint.pt" in result.stderr
    assert before == {f: open(os.path.join(dirpath, f), "rb").read() for dirpath, _, files in os.walk(out)
                      for f in files}
    assert sorted(os.listdir(out)) == [name]


def test_a_beam_that_cannot_fit_one_image_is_refused_with_the_figures(tmp_path):
    image = tmp_path / "red.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    model = os.path.join(FIXTURES, "legacy-model.pt")
    result = script("captioner.py", "--checkpoint", model, "--beam-size", "10000000000", image, "--device", "cpu",
                    "--max-length", "8")
    assert result.returncode == 1
    assert re.match(r"error: --beam-size 10000000000: decoding one image needs about [\d.]+ GiB "
                    r"\(10000000000 beams x a 7-token vocabulary\), more than the [\d.]+ GiB", last_error(result))
    result = script("evaluate.py", "--checkpoint", model, "--beam-size", "1", "10000000000", "--data-dir",
                    tmp_path / "nowhere", "--device", "cpu", "--out-dir", tmp_path / "eval", "--max-length", "8")
    assert result.returncode == 1 and "--beam-size 10000000000: decoding one image" in last_error(result)


def test_decoding_batches_fit_the_free_memory_and_say_so(monkeypatch, capsys):
    import captioner
    model, tokenizer, _ = load_model(os.path.join(FIXTURES, "legacy-model.pt"))
    tokens = torch.randn(7, 2, 4)
    whole = captioner.caption_image_tokens(model, tokenizer, tokens, 3, "cpu", 128, 8)
    per_image = 3 * (16 * 7 + 8 * 1 * 8 * (8 + 2) + 40 * 8)
    import support.processes
    monkeypatch.setattr(support.processes, "free_memory", lambda device: 2 * 2 * per_image)  # room for two
    assert captioner.caption_image_tokens(model, tokenizer, tokens, 3, "cpu", 128, 8) == whole
    assert "decoding 2 images at a time, not 128" in capsys.readouterr().err

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.20 GiB")
    monkeypatch.setattr(captioner, "beam_search", out_of_memory)
    with pytest.raises(ValueError, match="out of memory while decoding 2 images at beam size 3 on cpu; lower "
                                         "--beam-size or --batch-size"):
        captioner.caption_image_tokens(model, tokenizer, tokens, 3, "cpu", 128, 8)


def test_max_length_past_the_decoders_positions_is_refused_everywhere(tmp_path):
    from captioner import beam_search, sample_captions
    model = os.path.join(FIXTURES, "legacy-model.pt")  # its decoder has 16 positions
    decoder, _, _ = load_model(model)
    tokens = torch.randn(2, 2, 4)
    for decode in (lambda: beam_search(decoder, tokens, 2, 17), lambda: sample_captions(decoder, tokens, 2, 17)):
        with pytest.raises(ValueError, match="--max-length 17: this decoder reads at most 16 tokens"):
            decode()
    assert beam_search(decoder, tokens, 2, 16)[0].shape[1] <= 16
    image = tmp_path / "red.jpg"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    result = script("captioner.py", "--checkpoint", model, "--max-length", "100", image, "--device", "cpu")
    assert last_error(result) == "error: --max-length 100: this decoder reads at most 16 tokens"
    result = script("evaluate.py", "--checkpoint", model, "--max-length", "100", "--data-dir", tmp_path,
                    "--device", "cpu", "--out-dir", tmp_path / "eval")
    assert last_error(result) == "error: --max-length 100: this decoder reads at most 16 tokens"


def test_captions_that_are_not_valid_unicode_are_repaired_once_for_every_use(tiny_dataset, small_decoder_dir,
                                                                           capsys):
    from transformers import AutoTokenizer
    from evaluate import bleu4_original, bleu4_sacrebleu, coco_metrics

    def change(images):  # valid JSON: json.dump writes the lone surrogate as the escape \ud800
        images[16]["sentences"][0]["raw"] = "A red \ud800 picture."
        images[17]["sentences"][1]["raw"] = "Plain \udc00\ud83d\ude00 and simple."
    edit_dataset(tiny_dataset, change)
    items = data.read_split(tiny_dataset, "val")
    out = capsys.readouterr().out
    assert out.count("not valid Unicode") == 1 and "captions of 2 val entries" in out
    assert "images[16] (000000000016.jpg)" in out
    assert items[0].captions[0] == "A red \ufffd picture."
    assert items[1].captions[1] == "Plain \ufffd\U0001F600 and simple."  # the pair is kept whole
    references = [item.captions for item in items]
    tokenizer = AutoTokenizer.from_pretrained(small_decoder_dir)
    data.tokenize_captions(tokenizer, items, 40)  # train.py's use
    hypotheses = ["a red picture"] * len(items)
    coco_metrics(hypotheses, references)  # evaluate.py's and scst.py's
    bleu4_sacrebleu(hypotheses, references)
    bleu4_original(hypotheses, references, tokenizer)


def test_evaluate_finds_an_unwritable_out_dir_before_any_work(tmp_path, monkeypatch):
    import evaluate
    make_read_only(tmp_path / "eval", monkeypatch)
    args = evaluate.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "absent.pt"), "--out-dir",
                                                  str(tmp_path / "eval"), "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"--out-dir .*eval: cannot write here \(Read-only file system\); "
                                         r"choose another --out-dir"):
        evaluate.main(args)


def test_duplicate_entries_of_one_image_are_merged_with_their_captions(tiny_dataset, capsys):
    edit_dataset(tiny_dataset, lambda images: images.extend([dict(images[16], cocoid=100 + k, sentences=[
        {"raw": f"Copy {k} of the first val image."}]) for k in range(10_000)]))
    items = data.read_split(tiny_dataset, "val")
    assert len(items) == 4 and items[0].cocoid == 16
    assert len(items[0].captions) == 2 + 10_000 and items[0].captions[2] == "Copy 0 of the first val image."
    assert "10000 val entries name an image listed before" in capsys.readouterr().out


def test_a_signal_to_another_process_stops_rank_0_saying_why(monkeypatch):
    from support.processes import Processes, StopRequest
    from support.run import RunFiles, TrainState
    processes = Processes(rank=0, world_size=2)

    def all_reduce(flag, op=None):  # what rank 1, which got SIGTERM, contributes
        flag.fill_(1.0)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    stop_request = StopRequest(processes)
    assert stop_request.requested() and stop_request.signal == "a signal to another process"
    files = RunFiles(SimpleNamespace(out_dir="out"), processes)
    with pytest.raises(SystemExit, match="stopped by a signal to another process at step 3: out/checkpoint.pt"):
        files.end(stop_request, TrainState(step=3, epoch=0), 2, "done")
