"""The training loop: accumulation, schedule, padding, resume, overwrite protection, clear failures."""
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import train
import data
from captioner import CaptionModel, build_model, load_model
from support.files import safe_torch_load
from support.processes import Processes
from conftest import read_log, run_train, train_argv


def test_resume_equals_an_uninterrupted_run(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path):
    cache = tmp_path / "cache"
    # 16 images x 2 captions = 8 micro-batches of 4 = windows of 3 + 3 + 2: 3 optimizer steps per epoch
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "a", cache))
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "b", cache,
                         "--stop-after-steps", "2"))  # stops inside the first epoch
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2]
    with open(tmp_path / "b" / "log.jsonl", "a") as f:  # as if it had crashed after the checkpoint: steps
        f.write(json.dumps({"type": "train", "step": 3, "loss": 1.0}) + '\n{"type": "tr')  # to run again
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "b", cache,
                         "--resume", "--stop-after-steps", "2"))  # stops inside the second epoch
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "b", cache, "--resume"))

    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    train_a = [(r["step"], r["loss"]) for r in log_a if r["type"] == "train"]
    train_b = [(r["step"], r["loss"]) for r in log_b if r["type"] == "train"]
    assert [s for s, _ in train_a] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in train_b] == [s for s, _ in train_a]
    assert [l for _, l in train_b] == pytest.approx([l for _, l in train_a], rel=1e-6, abs=1e-7)
    epochs_a = [(r["val_loss"], r["val_bleu4"], r["val_cider_d"]) for r in log_a if r["type"] == "epoch"]
    epochs_b = [(r["val_loss"], r["val_bleu4"], r["val_cider_d"]) for r in log_b if r["type"] == "epoch"]
    assert len(epochs_a) == 2 and sum(epochs_b, ()) == pytest.approx(sum(epochs_a, ()), rel=1e-6)
    final_a = safe_torch_load(str(tmp_path / "a" / "checkpoint.pt"))
    final_b = safe_torch_load(str(tmp_path / "b" / "checkpoint.pt"))
    for name, tensor in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][name], tensor, rtol=1e-6, atol=1e-7)
    assert final_a["state"] == final_b["state"]
    assert os.path.isdir(tmp_path / "a" / "model")


def test_a_run_is_never_silently_overwritten(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path):
    argv = train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                      "--max-epochs", "1", "--stop-after-steps", "1")
    run_train(argv)
    before = (tmp_path / "out" / "checkpoint.pt").read_bytes()
    with pytest.raises(SystemExit, match="already holds a run"):
        run_train(argv)
    assert (tmp_path / "out" / "checkpoint.pt").read_bytes() == before
    with pytest.raises(SystemExit, match="other settings"):
        run_train(argv[:-2] + ["--resume", "--seed", "1"])
    run_train(argv + ["--overwrite"])  # explicit consent


def test_non_finite_loss_aborts_with_a_clear_message(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path,
                                                    monkeypatch):
    real = CaptionModel.forward

    def nan_loss(self, *args):
        logits, loss = real(self, *args)
        return logits, None if loss is None else loss * float("nan")
    monkeypatch.setattr(CaptionModel, "forward", nan_loss)
    with pytest.raises(SystemExit, match="training loss is nan at step 0"):
        run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out",
                             tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "out" / "checkpoint.pt")


@pytest.mark.parametrize("argv, message", [
    (["--vision-backbone", "resnet"],
     "unknown vision backbone 'resnet'; available backbones: blip:base, efficientnet-lite0"),
    (["--vision-backbone", "blip:coco"], "blip:coco: BLIP ViT-B/16 fine-tuned for COCO retrieval (384 px) is not "
                                         "offered"),  # named, and why
    (["--vision-backbone", "efficientnet-lite0", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--vision-backbone", "efficientnet-lite0", "--grad-clip", "0"], "--lr and --grad-clip must be > 0"),
])
def test_bad_arguments_fail_at_parsing(argv, message, capsys):
    parser = train.get_args_parser()
    with pytest.raises(SystemExit):
        train.check_args(parser.parse_args(argv), parser)
    assert message in capsys.readouterr().err


def test_accumulated_gradient_equals_the_one_big_batch(small_decoder_dir):
    model, tokenizer = build_model(small_decoder_dir, "test", image_width=6, image_grid=1)
    model.eval()  # no dropout, so that both computations see the same function
    captions = [[[int(t) for t in torch.randint(0, 50000, (n,))] + [tokenizer.eos_token_id]]
                for n in (2, 9, 4, 14, 1, 6, 3, 11)]  # very different lengths on purpose
    image_tokens = np.random.default_rng(0).standard_normal((8, 2, 6)).astype(np.float16)
    pairs = [(i, 0) for i in range(8)]
    processes = Processes(rank=0, world_size=1, device="cpu")
    scaler = torch.amp.GradScaler("cpu", enabled=False)

    def gradients(split):
        model.zero_grad(set_to_none=True)
        batches, start = [], 0
        for size in split:
            batches.append(train.make_batch(pairs[start:start + size], captions, image_tokens,
                                            tokenizer.eos_token_id))
            start += size
        loss, tokens = train.accumulate_gradients(model, batches, scaler, processes, "32")
        return loss, tokens, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_big, tokens_big, grads_big = gradients([8])
    for split in ([4, 4], [1, 7], [3, 3, 2]):
        loss, tokens, grads = gradients(split)
        assert tokens == tokens_big == sum(len(c[0]) for c in captions)
        assert loss.item() == pytest.approx(loss_big.item(), rel=1e-5)
        for name, grad in grads_big.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6)


def test_padding_is_never_trained_and_every_caption_ends_with_eos():
    eos = 9
    captions = [[[1, 2, 3, eos]], [[4, eos]]]
    tokens = np.zeros((2, 1, 3), dtype=np.float16)
    _, input_ids, labels = train.make_batch([(0, 0), (1, 0)], captions, tokens, eos)
    assert input_ids.tolist() == [[eos, 1, 2, 3], [eos, 4, eos, eos]]
    assert labels.tolist() == [[1, 2, 3, eos], [4, eos, -100, -100]]
    _, _, original_labels = train.make_batch([(0, 0), (1, 0)], captions, tokens, eos, train_padding=True)
    assert original_labels.tolist() == [[1, 2, 3, eos], [4, eos, eos, eos]]


def test_tokenized_captions_end_with_eos_and_respect_the_limit(small_decoder_dir):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(small_decoder_dir)
    items = [SimpleNamespace(captions=["A man riding a horse.", "word " * 50])]
    ids = data.tokenize_captions(tokenizer, items, max_tokens=10)
    assert ids[0][0] == [32, 582, 10311, 257, 8223, 13, 50256]
    assert len(ids[0][1]) == 10 and ids[0][1][-1] == 50256


def test_epoch_order_is_seeded_and_covers_the_data():
    captions = [[[1]] * 5, [[2]] * 5, [[3]] * 6]
    order = train.epoch_order(captions, epoch=0, seed=0, one_caption_per_image=False)
    assert sorted(order) == sorted((i, j) for i, c in enumerate(captions) for j in range(len(c)))
    assert order == train.epoch_order(captions, 0, 0, False)
    assert order != train.epoch_order(captions, 1, 0, False)
    one = train.epoch_order(captions, epoch=0, seed=0, one_caption_per_image=True)
    assert sorted(i for i, _ in one) == [0, 1, 2]


def test_lr_warms_up_then_follows_a_cosine_to_the_floor():
    args = SimpleNamespace(lr_schedule="cosine", lr=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
    lrs = [train.get_lr(step, 100, args) for step in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    args.lr_schedule = "constant"
    assert {train.get_lr(step, 100, args) for step in range(100)} == {1e-3}


def test_reading_a_dataset_with_problems_names_the_file(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path}: no dataset here: neither Karpathy's dataset_coco.json"):
        data.read_split(str(tmp_path), "train")
    (tmp_path / "dataset_coco.json").write_text("{not json")
    with pytest.raises(ValueError, match="dataset_coco.json: not a Karpathy-format split file"):
        data.read_split(str(tmp_path), "train")
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"split": "val", "filename": "a.jpg",
                                                                         "sentences": [{"raw": "x"}]}]}))
    with pytest.raises(ValueError,
                       match=r"split 'train' has no images with captions \(splits present: \['val'\]\)"):
        data.read_split(str(tmp_path), "train")


def test_no_two_seed_and_epoch_pairs_share_an_order():
    captions = [[[k]] for k in range(40)]
    orders = {tuple(train.epoch_order(captions, epoch, seed, False)) for seed, epoch in
              [(0, 1000), (1, 0), (0, 0), (1, 1000), (2, 0), (0, 2000)]}
    assert len(orders) == 6  # seed * 1000 + epoch made (0, 1000) equal (1, 0)


@pytest.mark.parametrize("flag, message", [
    ("--stop-after-steps", "--stop-after-steps must be 0 (off) or more"),
    ("--checkpoint-every", "--checkpoint-every must be 0 (off) or more"),
])
def test_negative_step_counts_are_refused(flag, message, capsys):
    parser = train.get_args_parser()
    with pytest.raises(SystemExit):
        train.check_args(parser.parse_args(["--vision-backbone", "efficientnet-lite0", flag, "-1"]), parser)
    assert message in capsys.readouterr().err


def test_a_finished_run_can_be_trained_for_more_epochs(tiny_dataset, small_decoder_dir, tiny_clip_dir,
                                                       tmp_path, capsys):
    argv = train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache")
    at = argv.index("--max-epochs")
    run_train(argv[:at] + ["--max-epochs", "1"] + argv[at + 2:])
    run_train(argv + ["--resume"])  # --max-epochs 2 now
    assert "--max-epochs 1 -> 2: the LR schedule is recomputed for 6 steps" in capsys.readouterr().out
    log = read_log(tmp_path / "out")
    assert [r["epoch"] for r in log if r["type"] == "epoch"] == [0, 1]
    assert [r["step"] for r in log if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_dying_between_the_epoch_record_and_the_checkpoint_logs_the_epoch_once(
        tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path):
    argv = train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                      "--max-epochs", "1")
    run_train(argv + ["--stop-after-steps", "3"])  # the epoch's last step: checkpoint before validation
    # validation logged, then killed before the checkpoint
    with open(tmp_path / "out" / "log.jsonl", "a") as f:
        f.write(json.dumps({"type": "epoch", "epoch": 0, "step": 3, "val_loss": 9.0, "val_bleu4": 0.0})
                + "\n")
    run_train(argv + ["--resume"])
    epochs = [r for r in read_log(tmp_path / "out") if r["type"] == "epoch"]
    assert len(epochs) == 1 and epochs[0]["val_loss"] != 9.0


def bucketing_args(**changes):
    return SimpleNamespace(**{"seed": 0, "one_caption_per_image": False, "batch_size": 4,
                              "accumulate_grad_batches": 2, "bucket_windows": 3, **changes})


def test_bucketing_keeps_every_caption_once_and_cuts_padding():
    rng = np.random.default_rng(0)
    captions = [[[7] * int(n) for n in rng.integers(3, 30, size=5)] for _ in range(40)]  # 200 captions
    everything = sorted((i, j) for i in range(40) for j in range(5))
    for epoch in range(3):
        windows = train.epoch_windows(captions, epoch, bucketing_args())
        assert sorted(p for w in windows for p in w) == everything  # each caption exactly once
        assert [len(w) for w in windows] == [8] * 25
        assert windows == train.epoch_windows(captions, epoch, bucketing_args())  # what a resume recomputes
    plain = train.epoch_windows(captions, 0, bucketing_args(bucket_windows=0))
    bucketed = train.epoch_windows(captions, 0, bucketing_args())
    assert train.padding_fraction(bucketed, captions, 4) < train.padding_fraction(plain, captions, 4) / 3
    assert train.epoch_windows(captions, 1, bucketing_args()) != bucketed


def test_tokens_gathered_on_the_device_equal_the_host_batch():
    captions = [[[1, 2, 9], [3, 9]], [[4, 5, 6, 9]], [[9]]]
    host = np.random.default_rng(0).standard_normal((3, 2, 4)).astype(np.float16)
    pairs = [(2, 0), (0, 1), (1, 0), (0, 0)]
    from_host = train.make_batch(pairs, captions, host, 9)
    from_device = train.make_batch(pairs, captions, torch.from_numpy(host), 9)  # the tensor path (the GPU's)
    for a, b in zip(from_host, from_device):
        assert torch.equal(a, b)


def test_the_fast_path_and_the_original_settings_take_the_same_step(small_decoder_dir):
    """Fused AdamW on one 8-caption micro-batch against the original's unfused AdamW on 2 x 4."""
    generator = torch.Generator().manual_seed(0)  # the same captions whatever ran before
    captions = [[[int(t) for t in torch.randint(0, 50000, (n,), generator=generator)] + [50256]]
                for n in (3, 8, 5, 12, 2, 7, 4, 9)]
    tokens = np.random.default_rng(0).standard_normal((8, 2, 6)).astype(np.float16)
    pairs = [(i, 0) for i in range(8)]
    processes = Processes(rank=0, world_size=1, device="cpu")
    results = []
    for fused, split in ((True, [8]), (False, [4, 4])):
        torch.manual_seed(0)  # the cross-attention starts random: the same for both
        model, _ = build_model(small_decoder_dir, "test", image_width=6, image_grid=1)
        model.eval()
        optimizer = train.make_optimizer(model, 1e-3, 0.01)
        if not fused:
            optimizer = torch.optim.AdamW(optimizer.param_groups, lr=1e-3, betas=(0.9, 0.999), fused=False)
        assert optimizer.defaults.get("fused", False) == fused
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        batches = [train.make_batch(pairs[k:k + n], captions, tokens, 50256) for k, n in zip((0, 4), split)]
        loss, _ = train.accumulate_gradients(model, batches, scaler, processes, "32")
        train.optimizer_step(optimizer, scaler, loss)
        results.append((loss.item(), {n: p.detach().clone() for n, p in model.named_parameters()}))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for name, weight in results[0][1].items():
        torch.testing.assert_close(weight, results[1][1][name], rtol=1e-5, atol=1e-6)


def test_a_non_finite_loss_never_reaches_the_weights_without_a_host_check(small_decoder_dir):
    model, _ = build_model(small_decoder_dir, "test", image_width=6, image_grid=1)
    optimizer = train.make_optimizer(model, 1e-3, 0.01)
    assert optimizer.defaults["fused"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.full_like(p, float("nan"))
    train.optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.tensor(float("nan")))
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_the_decoder_attends_with_sdpa(small_decoder_dir):
    model, _ = build_model(small_decoder_dir, "test", image_width=6, image_grid=1)
    assert model.decoder.config._attn_implementation == "sdpa"  # flash / memory-efficient kernels on a GPU


def test_cider_d_can_pick_the_best_epoch(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path):
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                         "--select-by", "cider_d", "--max-epochs", "3"))
    epochs = [r for r in read_log(tmp_path / "out") if r["type"] == "epoch"]
    kept = max(epochs, key=lambda r: (r["val_cider_d"], -r["val_loss"]))
    metadata = load_model(str(tmp_path / "out" / "model"))[2]["metadata"]
    assert metadata["epoch"] == kept["epoch"] and metadata["val_cider_d"] == kept["val_cider_d"]
    assert [r["best"] for r in epochs].count(True) >= 1


def test_a_non_finite_gradient_with_a_finite_loss_never_reaches_the_weights(small_decoder_dir):
    model, _ = build_model(small_decoder_dir, "test", image_width=6, image_grid=1)
    optimizer = train.make_optimizer(model, 1e-3, 0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    model.image_norm.weight.grad[0] = float("inf")  # one bad gradient, the loss finite
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    train.optimizer_step(optimizer, torch.amp.GradScaler("cpu", enabled=False), torch.tensor(2.5), grad_norm)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
