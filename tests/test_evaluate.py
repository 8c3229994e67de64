"""evaluate.py end to end: one row per beam size; metrics.json, captions.jsonl, gallery.html as documented."""
import json
import shutil

import pytest

import evaluate
from captioner import build_model, load_backbone, save_model


def test_evaluate_writes_metrics_and_captions(small_decoder_dir, tiny_clip_dir, tiny_dataset, tmp_path,
                                              capsys):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=1)
    checkpoint = tmp_path / "run" / "model"
    save_model(str(checkpoint), model, tokenizer, backbone.preprocessing)
    args = evaluate.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data-dir", tiny_dataset, "--split", "test",
        "--beam-size", "1", "3", "--max-length", "6", "--cache-dir", str(tmp_path / "cache"),
        "--device", "cpu", "--num-workers", "0", "--batch-size", "3"])
    evaluate.main(args)
    out = capsys.readouterr().out
    assert "| beam size | BLEU-1 | BLEU-2 | BLEU-3 | BLEU-4 | METEOR | ROUGE-L | CIDEr-D |" in out
    assert "sacrebleu signature: nrefs:2" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 4
    assert [r["beam_size"] for r in metrics["results"]] == [1, 3]
    for r in metrics["results"]:
        assert set(r) == {"beam_size", "bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l",
                          "cider_d", "bleu4_sacrebleu", "bleu4_original", "seconds"}
        assert all(0.0 <= r[k] <= 1.0 for k in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"))
        assert r["cider_d"] >= 0.0 and r["seconds"] > 0
        assert (r["meteor"] is None) == (shutil.which("java") is None)  # METEOR needs java
        assert r["meteor"] is None or 0.0 <= r["meteor"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 8
    assert {tuple(sorted(line)) for line in lines} == {("beam_size", "bleu4", "caption", "cider_d", "cocoid",
                                                        "filename")}
    assert [line["cocoid"] for line in lines[:4]] == [20, 21, 22, 23]  # the split's order, not shuffled
    for r in metrics["results"]:  # the corpus CIDEr-D is the mean of the captions' CIDEr-D
        mean = sum(line["cider_d"] for line in lines if line["beam_size"] == r["beam_size"]) / 4
        assert mean == pytest.approx(r["cider_d"], abs=1e-9)
    page = (tmp_path / "run" / "gallery.html").read_text()
    assert page.count("<img src=\"data:image/jpeg;base64,") == 3 * 4  # three views of all 4 images
    assert "<script" not in page and "http" not in page


def test_evaluate_refuses_a_bad_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 not a zip")
    args = evaluate.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "model.pt")])
    with pytest.raises(Exception, match="model.pt: not a readable PyTorch file"):
        evaluate.main(args)


def test_evaluate_without_java_reports_meteor_absent(small_decoder_dir, tiny_clip_dir, tiny_dataset, tmp_path,
                                                     capsys, monkeypatch):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=1)
    checkpoint = tmp_path / "run" / "model"
    save_model(str(checkpoint), model, tokenizer, backbone.preprocessing)
    which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *rest: None if name == "java" else which(name, *rest))
    args = evaluate.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data-dir", tiny_dataset, "--split", "test", "--max-length", "4",
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--num-workers", "0", "--gallery", "0"])
    evaluate.main(args)
    out = capsys.readouterr().out
    assert "no java on PATH, so no METEOR" in out
    row = next(line for line in out.splitlines() if line.startswith("| 1 |")).split(" | ")
    assert row[5] == "n/a"  # the METEOR column
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["results"][0]["meteor"] is None and metrics["results"][0]["cider_d"] >= 0.0
    assert not (tmp_path / "run" / "gallery.html").exists()  # --gallery 0


def test_evaluate_leaves_out_and_counts_unreadable_images(small_decoder_dir, tiny_clip_dir, tiny_dataset,
                                                          tmp_path, monkeypatch):
    monkeypatch.setattr(evaluate, "meteor_scorer", lambda: None)  # not under test here; saves its Java start
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=1)
    checkpoint = tmp_path / "run" / "model"
    save_model(str(checkpoint), model, tokenizer, backbone.preprocessing)
    with open(f"{tiny_dataset}/images/000000000021.jpg", "wb") as f:  # a test image, cut short
        f.write(b"\xff\xd8\xff\xe0 truncated")
    args = evaluate.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data-dir", tiny_dataset, "--split", "test", "--max-length", "4",
        "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--num-workers", "0"])
    evaluate.main(args)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["images"] == 3 and metrics["unreadable_images"] == 1
    assert "000000000021.jpg" in open(metrics["unreadable_file"]).read()
    lines = [json.loads(line) for line in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
    assert [line["cocoid"] for line in lines] == [20, 22, 23]
