"""CUDA paths: fp16 (GradScaler) and bf16 training, and beam search on the GPU. Skipped without a GPU."""
import json

import pytest
import torch

from conftest import image_tokens, run_train, tiny_model, train_argv

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("precision", ["16", "bf16"])
def test_mixed_precision_training_learns_on_gpu(precision, tiny_dataset, small_decoder_dir, tiny_clip_dir,
                                                tmp_path):
    argv = train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                      "--max-epochs", "6", "--lr", "3e-3")
    argv[argv.index("--device") + 1] = "cuda"
    argv[argv.index("--precision") + 1] = precision
    run_train(argv)
    records = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert all(map(lambda x: x == x and abs(x) < 1e4, losses))
    assert losses[-1] < losses[0] - 1.0
    checkpoint = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    assert checkpoint["scaler"] == {} or checkpoint["scaler"]["scale"] > 0  # GradScaler state saved for fp16


def test_beam_search_on_gpu_matches_cpu():
    model = tiny_model(seed=5)
    tokens = image_tokens(model, 12)
    from captioner import beam_search
    for beam_size in (1, 3):
        ids_cpu, scores_cpu = beam_search(model, tokens, beam_size, max_length=10)
        ids_gpu, scores_gpu = beam_search(model.cuda(), tokens.cuda(), beam_size, max_length=10)
        model.cpu()
        assert torch.equal(ids_gpu.cpu(), ids_cpu)
        torch.testing.assert_close(scores_gpu.cpu(), scores_cpu, rtol=1e-4, atol=1e-4)
