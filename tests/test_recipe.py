"""train.py's levers against overfitting: label smoothing, the weight average (EMA), augmented views, dropout."""
import glob
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train
from captioner import load_model
from conftest import read_log, run_train, tiny_model, image_tokens, train_argv
from support.ema import WeightAverage
from support.files import safe_torch_load
from support.views import VIEWS, draw_views, mirrorable, view_pixels

LEVERS = ("--label-smoothing", "0.1", "--ema-decay", "0.9", "--augment-views", "3", "--dropout", "0.2",
          "--image-dropout", "0.1")


def test_label_smoothing_changes_the_loss_as_defined():
    model = tiny_model()
    tokens = image_tokens(model, 3)
    input_ids = torch.tensor([[4, 0, 1], [4, 2, 2], [4, 3, 0]])
    positions, labels = torch.arange(9), torch.tensor([0, 1, 4, 2, 2, 4, 3, 0, 4])
    logits, plain = model(tokens, input_ids, positions, labels)
    _, smoothed = model(tokens, input_ids, positions, labels, label_smoothing=0.2)
    log_p = F.log_softmax(logits.double(), dim=-1)  # (9, V)
    nll = -log_p[torch.arange(9), labels]
    uniform = -log_p.mean(dim=-1)  # the cross-entropy against the uniform distribution over the vocabulary
    assert plain.item() == pytest.approx(nll.sum().item(), rel=1e-5)
    assert smoothed.item() == pytest.approx((0.8 * nll + 0.2 * uniform).sum().item(), rel=1e-5)
    assert smoothed.item() != pytest.approx(plain.item(), rel=1e-3)


def test_the_weight_average_follows_its_formula_and_swaps_back():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    average = WeightAverage(model, decay=0.8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    for n in range(1, 31):  # past the warm-up: (1 + n) / (10 + n) reaches 0.8 at n = 26
        optimizer.zero_grad()
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        average.update()
        decay = min(0.8, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            expected[name] = decay * expected[name] + (1 - decay) * p.detach().double()
    for name, value in expected.items():
        torch.testing.assert_close(average.average[name].double(), value, rtol=1e-5, atol=1e-6)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}
    with average.swapped_in():
        torch.testing.assert_close(model.weight.detach(), average.average["weight"])
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), raw[name])
    copy = WeightAverage(torch.nn.Linear(4, 3), decay=0.5)
    copy.load_state_dict(average.state_dict())
    assert copy.updates == 30 and copy.decay == 0.8
    torch.testing.assert_close(copy.average["bias"], average.average["bias"])


def test_views_are_drawn_from_the_seed_and_epoch_and_never_mirror_left_or_right():
    captions = [["a dog"] * 5, ["a man on the left"] * 5, ["a cat"] * 400]
    mirror_ok = [mirrorable(c) for c in captions]
    assert mirror_ok == [True, False, True]
    first = draw_views(captions, mirror_ok, 5, epoch=2, seed=0)
    assert first == draw_views(captions, mirror_ok, 5, epoch=2, seed=0)
    assert first != draw_views(captions, mirror_ok, 5, epoch=3, seed=0)
    assert first != draw_views(captions, mirror_ok, 5, epoch=2, seed=1)
    assert [len(v) for v in first] == [5, 5, 400]
    mirrored = {k + 1 for k, name in enumerate(VIEWS) if "mirrored" in name}
    for epoch in range(20):
        assert not mirrored & set(draw_views(captions, mirror_ok, 5, epoch, 0)[1])
    assert set(first[2]) == set(range(6))  # the plain image and all five views, for 400 captions
    assert not mirrorable(["Two cups, one to the RIGHT of a plate."]) and mirrorable(["A bright day."])


def test_the_views_are_the_crops_and_mirrors_they_name():
    pixels = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    torch.testing.assert_close(view_pixels("mirrored", pixels), pixels.flip(-1))
    top_left = view_pixels("top-left", pixels)
    expected = F.interpolate(pixels[..., :14, :14], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(top_left, expected)
    torch.testing.assert_close(view_pixels("top-left mirrored", pixels), expected.flip(-1))
    bottom_right = F.interpolate(pixels[..., 2:, 2:], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(view_pixels("bottom-right", pixels), bottom_right)
    with pytest.raises(ValueError, match="unknown view"):
        view_pixels("upside-down", pixels)


def test_every_lever_resumes_exactly(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path):
    cache = tmp_path / "cache"
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "a", cache, *LEVERS))
    # the views are embedded once, beside the plain tokens: three train view caches, and the second run
    # (stopped and resumed twice) embeds nothing
    views = sorted(os.path.basename(p).split("-clip")[0] for p in glob.glob(str(cache / "train-*.npy")))
    assert views == ["train", "train-bottom-right", "train-mirrored", "train-top-left"]
    stamps = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(cache / "*.npy"))}
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "b", cache, *LEVERS,
                         "--stop-after-steps", "2"))
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "b", cache, *LEVERS,
                         "--resume", "--stop-after-steps", "2"))
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "b", cache, *LEVERS,
                         "--resume"))
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(str(cache / "*.npy"))} == stamps

    log_a, log_b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    losses = [[(r["step"], r["loss"]) for r in log if r["type"] == "train"] for log in (log_a, log_b)]
    assert [s for s, _ in losses[0]] == [1, 2, 3, 4, 5, 6] == [s for s, _ in losses[1]]
    assert [l for _, l in losses[1]] == pytest.approx([l for _, l in losses[0]], rel=1e-6, abs=1e-7)
    epochs = [[(r["val_loss"], r["val_cider_d"]) for r in log if r["type"] == "epoch"] for log in (log_a, log_b)]
    assert sum(epochs[1], ()) == pytest.approx(sum(epochs[0], ()), rel=1e-6)
    final_a, final_b = (safe_torch_load(str(tmp_path / run / "checkpoint.pt")) for run in ("a", "b"))
    assert final_a["ema"]["updates"] == final_b["ema"]["updates"] == 6
    for name, tensor in final_a["ema"]["average"].items():
        torch.testing.assert_close(final_b["ema"]["average"][name], tensor, rtol=1e-6, atol=1e-7)
    for name, tensor in final_a["model"].items():
        torch.testing.assert_close(final_b["model"][name], tensor, rtol=1e-6, atol=1e-7)


def test_the_saved_model_is_the_weight_average(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path):
    run_train(train_argv(tiny_dataset, small_decoder_dir, tiny_clip_dir, tmp_path / "out", tmp_path / "cache",
                         "--max-epochs", "1", "--ema-decay", "0.9", "--dropout", "0.3", "--image-dropout",
                         "0.2"))
    checkpoint = safe_torch_load(str(tmp_path / "out" / "checkpoint.pt"))
    model, _, _ = load_model(str(tmp_path / "out" / "model"))
    saved = dict(model.named_parameters())
    assert checkpoint["ema"]["updates"] == 3
    for name, tensor in checkpoint["ema"]["average"].items():
        torch.testing.assert_close(saved[name].detach(), tensor)
        assert name == "image_slot_embedding" or not torch.equal(checkpoint["model"][name], tensor), name
    # the dropout flags reach the model, and stay with it
    assert model.decoder.config.resid_pdrop == model.decoder.config.attn_pdrop == 0.3
    assert model.config.image_dropout == 0.2 and model.image_dropout.p == 0.2
    tokens = torch.randn(2, model.config.num_image_tokens, model.config.image_width)
    torch.testing.assert_close(model.eval().encode_images(tokens), model.encode_images(tokens))  # no dropout
    assert not torch.equal(model.train().encode_images(tokens), model.eval().encode_images(tokens))


def test_view_batches_gather_each_pairs_view():
    plain = np.zeros((3, 2, 4), np.float16)
    views = [plain, plain + 1, plain + 2]
    captions = [[[5, 9]], [[6, 9]], [[7, 9]]]
    pairs = [(2, 0), (0, 0), (1, 0)]
    host, _, _ = train.make_batch(pairs, captions, views, 9, views=[1, 2, 0])
    device, _, _ = train.make_batch(pairs, captions, torch.from_numpy(np.stack(views)), 9, views=[1, 2, 0])
    assert host[:, 0, 0].tolist() == device[:, 0, 0].tolist() == [1, 2, 0]


@pytest.mark.parametrize("flag, value", [("--label-smoothing", "1"), ("--ema-decay", "-0.1"),
                                         ("--dropout", "1.5"), ("--image-dropout", "nan"),
                                         ("--augment-views", str(len(VIEWS) + 1))])
def test_lever_values_out_of_range_are_refused(flag, value, capsys):
    parser = train.get_args_parser()
    with pytest.raises(SystemExit):
        train.check_args(parser.parse_args([flag, value]), parser)
    assert flag in capsys.readouterr().err
