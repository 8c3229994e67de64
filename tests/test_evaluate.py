"""evaluate.py end to end: one row per beam size, metrics.json and captions.jsonl as documented."""
import json

import pytest

import evaluate
from captioner import build_model, load_backbone, save_model


def test_evaluate_writes_metrics_and_captions(small_decoder_dir, tiny_clip_dir, tiny_dataset, tmp_path, capsys):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=1)
    checkpoint = tmp_path / "run" / "model.pt"
    save_model(str(checkpoint), model, tokenizer, backbone.preprocessing)
    args = evaluate.get_args_parser().parse_args([
        "--checkpoint", str(checkpoint), "--data-dir", tiny_dataset, "--split", "test", "--beam-size", "1", "3",
        "--max-length", "6", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--num-workers", "0",
        "--batch-size", "3"])
    evaluate.main(args)
    out = capsys.readouterr().out
    assert "| beam size | BLEU-4 (COCO protocol)" in out and "sacrebleu signature: nrefs:2" in out
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["images"] == 4
    assert [r["beam_size"] for r in metrics["results"]] == [1, 3]
    for r in metrics["results"]:
        assert set(r) == {"beam_size", "bleu4_coco", "bleu4_sacrebleu", "bleu4_seed", "seconds"}
        assert 0.0 <= r["bleu4_coco"] <= 1.0 and r["seconds"] > 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "captions.jsonl").read_text().splitlines()]
    assert len(lines) == 8 and {tuple(sorted(line)) for line in lines} == {("beam_size", "caption", "cocoid", "filename")}
    assert [line["cocoid"] for line in lines[:4]] == [20, 21, 22, 23]  # the split's order, not shuffled


def test_evaluate_refuses_a_bad_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04 not a zip")
    args = evaluate.get_args_parser().parse_args(["--checkpoint", str(tmp_path / "model.pt")])
    with pytest.raises(Exception, match="model.pt: not a readable PyTorch file"):
        evaluate.main(args)


def test_evaluate_leaves_out_and_counts_unreadable_images(small_decoder_dir, tiny_clip_dir, tiny_dataset, tmp_path):
    backbone = load_backbone(f"clip:{tiny_clip_dir}")
    model, tokenizer = build_model(small_decoder_dir, backbone.name, image_width=backbone.width, image_grid=1)
    checkpoint = tmp_path / "run" / "model.pt"
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
