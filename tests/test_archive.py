"""The model folder (config.json, model.safetensors, the tokenizer's files): plain data, safe loading, clear
errors, earlier releases' model.pt still read; the inference API and CLI on top of it."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from captioner import (ArchiveError, Captioner, beam_search, build_model, load_backbone, load_model,
                       save_model)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def archive(small_decoder_dir, tiny_clip_dir, tmp_path):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=2)
    path = str(tmp_path / "model")
    save_model(path, model, tokenizer, backbone.preprocessing, {"epoch": 3})
    return path, model.eval(), tokenizer


def test_round_trip_is_exact_and_the_folder_holds_no_pickle(archive):
    from safetensors import safe_open
    path, model, tokenizer = archive
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= \
        set(os.listdir(path))  # and special_tokens_map.json where transformers writes one
    for name in os.listdir(path):  # JSON, safetensors and text only: nothing a pickle or a zip could hide in
        head = open(os.path.join(path, name), "rb").read(2)
        assert head not in (b"PK", b"\x80\x02", b"\x80\x04", b"\x80\x05"), name
    with open(os.path.join(path, "config.json")) as f:
        description = json.load(f)
    assert description["metadata"] == {"epoch": 3} and description["config"]["image_grid"] == 2
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        stored = {key: f.get_tensor(key) for key in f.keys()}
    state = model.state_dict()
    assert set(stored) | set(description["tied"]) == set(state)
    assert all(torch.equal(stored[key], state[key]) for key in stored)
    loaded, loaded_tokenizer, _ = load_model(path)
    tokens = torch.randn(3, model.config.num_image_tokens, model.config.image_width)
    input_ids = torch.randint(0, 50257, (3, 7))
    torch.testing.assert_close(loaded(tokens, input_ids)[0], model(tokens, input_ids)[0], rtol=0, atol=0)
    text = "A man riding a horse."
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.decode([32, 582, 13]) == "A man."
    assert not loaded.training


class Malicious:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['MARKER']}",))


def test_a_pickled_object_file_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "executed"
    monkeypatch.setenv("MARKER", str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"format": "captioner-model", "model": Malicious()}, path)
    with pytest.raises(ArchiveError, match="evil.pt: refused to load: the file needs pickled Python objects"):
        load_model(str(path))
    assert not marker.exists()


def test_truncated_and_foreign_files_give_clear_errors(tmp_path):
    data = open(os.path.join(FIXTURES, "legacy-model.pt"), "rb").read()  # an earlier release's model.pt
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArchiveError, match="truncated.pt: not a readable PyTorch file"):
        load_model(str(truncated))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ArchiveError, match="notes.pt: not a readable PyTorch file"):
        load_model(str(text))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    with pytest.raises(ArchiveError, match="foreign.pt: not a captioner-model file"):
        load_model(str(foreign))
    with pytest.raises(ArchiveError, match="missing.pt: not a model folder .* nor a Hub id like user/name"):
        load_model(str(tmp_path / "missing.pt"))
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ArchiveError, match="folder: not a model folder: no model.safetensors, tokenizer.json"):
        load_model(str(folder))
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(ArchiveError, match="folder: damaged model folder: ValueError: format None"):
        load_model(str(folder))


def test_captioner_api_single_and_batched(archive, tiny_dataset):
    path, model, _ = archive
    cap = Captioner.load(path)
    images = [os.path.join(tiny_dataset, "images", f"{i:012d}.jpg") for i in range(3)]
    one = cap(images[0], beam_size=2, max_length=6)
    many = cap(images, beam_size=2, max_length=6)
    assert isinstance(one, str) and isinstance(many, list) and len(many) == 3
    assert many[0] == one  # batching does not change a caption
    tokens = cap.encode(images)
    assert tokens.shape == (3, 5, 32)  # 1 global + 2 x 2 grid tokens of CLIP width 32
    ids, scores = beam_search(cap.model, tokens, beam_size=2, max_length=6)
    assert ids.shape[0] == 3 and scores.shape == (3,)


def test_command_line_prints_path_and_caption(archive, tiny_dataset):
    path, _, _ = archive
    images = [os.path.join(tiny_dataset, "images", f"{i:012d}.jpg") for i in range(2)]
    result = subprocess.run([sys.executable, "captioner.py", "--checkpoint", path, "--beam-size", "2",
                             "--max-length", "5", "--device", "cpu", *images],
                            capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)),
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == images
    bad = subprocess.run([sys.executable, "captioner.py", "--checkpoint", images[0], images[0]],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert bad.returncode != 0
    assert "not a readable PyTorch file" in bad.stderr and "Traceback" not in bad.stderr


def test_widths_come_from_the_configs(small_decoder_dir, tmp_path):
    # a 1024-d backbone (CLIP ViT-L) in front of a 32-d decoder: nothing about either width is hard-coded
    model, tokenizer = build_model(small_decoder_dir, "clip:ViT-L/14", image_width=1024, image_grid=3)
    tokens = torch.randn(2, 10, 1024)
    assert model(tokens, torch.randint(0, 50257, (2, 5)))[0].shape == (2, 5, 50257)
    save_model(str(tmp_path / "m"), model, tokenizer, {"size": 224})
    loaded, _, _ = load_model(str(tmp_path / "m"))
    ids, _ = beam_search(loaded, tokens, beam_size=2, max_length=4)
    assert ids.shape[0] == 2
    expected = r"expected image tokens of shape \(B, 10, 1024\), got \(2, 10, 768\)"
    with pytest.raises(ValueError, match=expected):
        loaded(torch.randn(2, 10, 768), torch.zeros(2, 3, dtype=torch.long))


def test_saved_files_follow_the_umask(archive, tmp_path):
    from support.files import atomic_write
    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "f.json"), lambda f: f.write(b"{}"))
        _, model, tokenizer = archive
        save_model(str(tmp_path / "m"), model, tokenizer, {"size": 32})
    finally:
        os.umask(old)
    assert oct(os.stat(tmp_path / "f.json").st_mode & 0o777) == oct(0o644)  # mkstemp alone gives 0600
    assert oct(os.stat(tmp_path / "m").st_mode & 0o777) == oct(0o755)  # mkdtemp alone gives 0700
    assert {oct(os.stat(tmp_path / "m" / name).st_mode & 0o777) for name in os.listdir(tmp_path / "m")} == \
        {oct(0o644)}


def test_tied_weights_are_stored_once(archive):
    from support.files import cpu_state_dict
    state = cpu_state_dict(archive[1])
    assert state["decoder.lm_head.weight"] is state["decoder.transformer.wte.weight"]
    from safetensors import safe_open
    with safe_open(os.path.join(archive[0], "model.safetensors"), "pt") as f:
        assert "decoder.transformer.wte.weight" in f.keys() and "decoder.lm_head.weight" not in f.keys()
    with open(os.path.join(archive[0], "config.json")) as f:
        assert json.load(f)["tied"] == {"decoder.lm_head.weight": "decoder.transformer.wte.weight"}
    loaded, _, _ = load_model(archive[0])
    assert loaded.decoder.lm_head.weight is loaded.decoder.transformer.wte.weight


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA GPU: .cpu() copies each key off a GPU")
def test_tied_weights_from_a_gpu_model_are_stored_once(archive):
    from support.files import cpu_state_dict
    state = cpu_state_dict(archive[1].cuda())
    assert state["decoder.lm_head.weight"] is state["decoder.transformer.wte.weight"]


def test_the_api_sees_the_image_tokens_that_training_cached(archive, tiny_dataset, tmp_path):
    import data
    items = data.read_split(tiny_dataset, "val")
    cap = Captioner.load(archive[0])
    cached, _ = data.cached_image_tokens(items, "val", cap.model.config.vision_backbone, 2,
                                         str(tmp_path / "c"), num_workers=0)
    encoded = cap.encode([item.path for item in items])
    torch.testing.assert_close(encoded, torch.from_numpy(np.array(cached)).float(),
                               rtol=0, atol=0)  # same precision, rounded to float16 as the cache holds them



def test_files_written_before_the_support_refactor_still_load(tmp_path):
    """model.pt and checkpoint.pt written by main before support/ existed (tests/fixtures/, made by
    make_legacy_fixtures.py on that commit): they load, caption as they did, and a run resumes from them."""
    import train
    from captioner import ids_to_text, model_from_data
    from support.processes import Processes
    from support.run import CHECKPOINT_VERSION, LATER_DEFAULTS, TrainState, load_checkpoint, restore
    with open(os.path.join(FIXTURES, "legacy-expected.json")) as f:
        expected = json.load(f)
    model, tokenizer, archive = load_model(os.path.join(FIXTURES, "legacy-model.pt"))
    assert archive["metadata"]["val_bleu4"] == 0.25  # it calls it val_bleu4_coco
    tokens = torch.tensor(expected["image_tokens"])
    for beam, captions in expected["model_captions"].items():
        assert ids_to_text(tokenizer, beam_search(model, tokens, int(beam), 8)[0]) == captions
    path = os.path.join(FIXTURES, "legacy-checkpoint.pt")
    # today's train.py resumes it with the levers added since at their defaults (off), as that run trained
    settings = {**expected["settings"], **LATER_DEFAULTS}
    checkpoint = load_checkpoint(path, settings, train.RESUME_MUST_MATCH, world_size=1)
    assert checkpoint["version"] == CHECKPOINT_VERSION
    resumed, tokenizer = model_from_data(checkpoint["config"], checkpoint["model"], checkpoint["tokenizer"], path)
    for beam, captions in expected["checkpoint_captions"].items():  # its weights: one optimizer step later
        assert ids_to_text(tokenizer, beam_search(resumed, tokens, int(beam), 8)[0]) == captions
    optimizer = train.make_optimizer(resumed, 1e-3, 0.01)
    state = restore(checkpoint, optimizer, torch.amp.GradScaler("cpu", enabled=False), Processes())
    assert state == TrainState(**expected["state"]) and optimizer.state_dict()["state"]
    wrong = dict(checkpoint["config"], image_width=5)  # weights that do not fit the config: named, not loaded
    with pytest.raises(ArchiveError, match="legacy-checkpoint.pt: damaged checkpoint: .*do not fit its config"):
        model_from_data(wrong, checkpoint["model"], checkpoint["tokenizer"], path, "checkpoint")
    # older version-1 files: the best score under its first name, settings that did not exist yet
    old = torch.load(path, weights_only=True)
    old["state"]["best_bleu4"] = old["state"].pop("best_score")
    del old["args"]["bucket_windows"], old["args"]["select_by"]
    torch.save(old, tmp_path / "older.pt")
    upgraded = load_checkpoint(str(tmp_path / "older.pt"), settings, train.RESUME_MUST_MATCH, 1)
    assert upgraded["state"]["best_score"] == 0.25 and upgraded["args"]["select_by"] == "bleu4"


def test_save_pretrained_and_from_pretrained_give_the_same_captions(archive, tiny_dataset, tmp_path):
    images = [os.path.join(tiny_dataset, "images", f"{i:012d}.jpg") for i in range(3)]
    cap = Captioner.load(archive[0])
    cap.save_pretrained(str(tmp_path / "again"))
    again = Captioner.from_pretrained(str(tmp_path / "again"))
    assert again(images, beam_size=2, max_length=6) == cap(images, beam_size=2, max_length=6)
    assert again.metadata == {"epoch": 3} and "# Image captioner" in (tmp_path / "again" / "README.md").read_text()


def test_an_old_model_pt_converts_to_a_folder_that_captions_the_same(tmp_path):
    from captioner import ids_to_text
    old = os.path.join(FIXTURES, "legacy-model.pt")
    result = subprocess.run([sys.executable, "captioner.py", "--checkpoint", old, "--convert",
                             str(tmp_path / "m")], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    with open(os.path.join(FIXTURES, "legacy-expected.json")) as f:
        expected = json.load(f)
    model, tokenizer, description = load_model(str(tmp_path / "m"))
    tokens = torch.tensor(expected["image_tokens"])
    for beam, captions in expected["model_captions"].items():
        assert ids_to_text(tokenizer, beam_search(model, tokens, int(beam), 8)[0]) == captions
    assert description["metadata"]["val_bleu4"] == 0.25  # the old name, val_bleu4_coco, is read as today's
    other = tmp_path / "run"  # a folder of other files is never replaced by a model
    other.mkdir()
    (other / "checkpoint.pt").write_bytes(b"weeks of training")
    refused = subprocess.run([sys.executable, "captioner.py", "--checkpoint", old, "--convert", str(other)],
                             capture_output=True, text=True, cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert refused.returncode == 1 and "not a model folder this program wrote; refusing" in refused.stderr
    assert (other / "checkpoint.pt").read_bytes() == b"weeks of training"


def test_a_hub_id_loads_through_the_hub_client_and_offline_says_what_to_do(archive, monkeypatch):
    import huggingface_hub
    calls = []

    def from_the_cache(repo_id, allow_patterns=None, **kwargs):  # the Hub client, pointed at a local copy
        calls.append((repo_id, tuple(allow_patterns)))
        return archive[0]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", from_the_cache)
    model, _, description = load_model("someone/captioner-coco")
    assert calls[0][0] == "someone/captioner-coco" and "model.safetensors" in calls[0][1]
    assert description["metadata"] == {"epoch": 3}
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network and nothing cached
    monkeypatch.setenv("HF_HUB_CACHE", str(os.path.join(os.path.dirname(archive[0]), "empty-cache")))
    with pytest.raises(ArchiveError, match="someone/captioner-coco: not downloaded yet, and the Hub cannot be "
                                           "reached"):
        load_model("someone/captioner-coco")
