"""`difflab demo --text`: captions name the right digits, train() passes per-example conditioning
(and its default path draws exactly what it drew before), and a tiny end-to-end run writes
samples.png and report.json with finite figures and exactly kept known pixels."""
import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from difflab.demos import text as dt
from difflab.core import Denoiser, VPDiscrete
from difflab.nn.text import build_vocab, words
from difflab.train import TrainConfig, draw_batch, train


# ----------------------------------------------------------------------------------------------
# Captions


def test_captions_name_the_digit_they_were_made_for():
    for d in range(10):
        for tpl in dt.TRAIN_TEMPLATES + dt.HELD_OUT_TEMPLATES:
            text = dt.caption(d, tpl)
            assert dt.digit_named(text) == d, text
    assert dt.caption(7, "a handwritten {word}") == "a handwritten seven"
    assert dt.caption(3, "the digit {num}") == "the digit 3"
    assert dt.digit_named("") is None and dt.digit_named("a handwritten digit") is None
    # every class is seen in training both as a word and as a numeral
    assert any("{word}" in t for t in dt.TRAIN_TEMPLATES) and any("{num}" in t for t in dt.TRAIN_TEMPLATES)


def test_held_out_templates_are_new_captions_of_known_words():
    labels = torch.tensor([3, 0, 9, 7])
    index, texts = dt.caption_dataset(labels)
    assert len(texts) == len(index) == 4 * len(dt.TRAIN_TEMPLATES)
    assert all(dt.digit_named(t) == int(labels[i]) for i, t in zip(index, texts))  # each caption names its example's digit
    _, all_train = dt.caption_dataset(torch.arange(10))
    vocab = set(build_vocab(all_train))
    held = [dt.caption(d, t) for d in range(10) for t in dt.HELD_OUT_TEMPLATES]
    assert not set(held) & set(all_train)  # never seen as a caption ...
    assert all(w in vocab for text in held for w in words(text))  # ... but made of words the encoder knows
    assert max(len(words(t)) for t in all_train + held) <= 8  # within the encoder's window


# ----------------------------------------------------------------------------------------------
# The conditioning hook of train()


class RecordingNet(nn.Module):
    """net(x_in, t, input_ids=None, class_labels=None): an MLP that records what it is given."""

    def __init__(self, dim=2, vocab=20):
        super().__init__()
        self.config = type("Cfg", (), {"num_classes": 3})()
        self.emb = nn.EmbeddingBag(vocab, 16, mode="sum", padding_idx=0)
        self.inp, self.out = nn.Linear(dim + 1, 16), nn.Linear(16, dim)
        self.seen = []

    def forward(self, x, t, input_ids=None, class_labels=None):
        self.seen.append((x.detach().clone(), input_ids, class_labels))
        h = self.inp(torch.cat([x, t[:, None].to(x.dtype) / 100], 1))
        if input_ids is not None:
            h = h + self.emb(input_ids)
        return self.out(torch.tanh(h))


def _data(n=24):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n, 2, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    ids = torch.randint(1, 20, (n, 5), generator=g)
    return images, labels, ids


def test_train_passes_per_example_conditioning_with_cfg_dropout(tmp_path):
    images, _, ids = _data()
    torch.manual_seed(0)
    net = RecordingNet()
    d = Denoiser(net, VPDiscrete.from_name("linear", 100), "eps")
    null = torch.zeros(5, dtype=torch.long)
    cfg = TrainConfig(steps=6, batch_size=8, lr=1e-2, cfg_dropout=0.3, checkpoint_every=0, log_every=0, progress=False, seed=3)
    state = train(d, (images, None, {"input_ids": ids}), cfg, tmp_path, null_cond={"input_ids": null})
    assert state.step == 6 and len(net.seen) == 6
    dropped = kept = 0
    for step, (x_in, got, labels) in enumerate(net.seen):
        assert labels is None and got.shape == (8, 5) and got.dtype == torch.long
        batch = draw_batch(images, None, d.frame, cfg, step, cond={"input_ids": ids}, null_cond={"input_ids": null})
        assert torch.equal(got, batch["input_ids"])
        # each row is its own example's ids, or the null ids when dropped
        rows = [int((images == x0).all(1).nonzero()[0]) for x0 in batch["x0"]]
        for r, row in zip(rows, got):
            if torch.equal(row, null):
                dropped += 1
            else:
                assert torch.equal(row, ids[r])
                kept += 1
    assert dropped > 0 and kept > dropped


def test_conditioning_draws_leave_the_default_batch_unchanged():
    images, labels, ids = _data()
    frame = VPDiscrete.from_name("linear", 100)
    cfg = TrainConfig(batch_size=8, cfg_dropout=0.5, seed=1)
    for step in range(3):
        plain = draw_batch(images, labels, frame, cfg, step, null_class=3)
        assert set(plain) == {"x0", "sigma", "noise", "class_labels"}
        both = draw_batch(images, labels, frame, cfg, step, null_class=3, cond={"input_ids": ids},
                          null_cond={"input_ids": torch.zeros(5, dtype=torch.long)})
        for k in plain:
            assert torch.equal(plain[k], both[k]), k
        # the label and the caption are dropped in the same examples
        assert torch.equal(both["class_labels"] == 3, (both["input_ids"] == 0).all(1))
    # no labels, no cond: no dropout draw at all, as before
    a = draw_batch(images, None, frame, cfg, 0)
    b = draw_batch(images, None, frame, dataclasses.replace(cfg, cfg_dropout=0.0), 0)
    assert all(torch.equal(a[k], b[k]) for k in ("x0", "sigma", "noise")) and a["class_labels"] is None


def test_conditioning_errors_are_clear(tmp_path):
    images, labels, ids = _data()
    d = Denoiser(RecordingNet(), VPDiscrete.from_name("linear", 100), "eps")
    cfg = TrainConfig(steps=1, batch_size=4, cfg_dropout=0.2, checkpoint_every=0, log_every=0, progress=False)
    with pytest.raises(ValueError, match="null_cond.*input_ids"):
        train(d, (images, None, {"input_ids": ids}), cfg, tmp_path)
    with pytest.raises(ValueError, match="one row per example"):
        train(d, (images, None, {"input_ids": ids[:5]}), cfg, tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        train(d, (images, None, {"class_labels": labels}), cfg, tmp_path)


# ----------------------------------------------------------------------------------------------
# End to end


TINY = dataclasses.replace(dt.DEMO, vae_channels=(8, 16, 16), vae_steps=3, vae_batch=16, text_width=16, text_layers=1,
                           unet_channels=16, steps=3, batch_size=16)


def test_tiny_end_to_end_run_writes_samples_and_report(tmp_path):
    report = dt.run_text_demo(tmp_path, sampling_steps=2, samples_per_prompt=1, edit_digits=10, progress=False,
                              config=TINY)
    assert (tmp_path / "samples.png").stat().st_size > 0 and (tmp_path / "editing.png").exists()
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk.keys() == report.keys()
    for section, keys in {
        "text_to_image": ["accuracy", "accuracy_train_templates", "accuracy_heldout_templates", "accuracy_unguided", "frechet"],
        "inpainting": ["known_max_abs_diff", "judge_accuracy"],
        "outpainting": ["known_max_abs_diff", "border_mean"],
        "inversion": ["psnr", "psnr_vae_only", "judge_accuracy"],
        "vae": ["psnr_heldout", "scaling_factor", "shift_factor"],
    }.items():
        for k in keys:
            assert math.isfinite(on_disk[section][k]), (section, k, on_disk[section][k])
    t = on_disk["text_to_image"]
    assert t["n_generated"] == 10 * (len(dt.TRAIN_TEMPLATES) + len(dt.HELD_OUT_TEMPLATES))
    assert all(0.0 <= t[k] <= 1.0 for k in ("accuracy", "accuracy_train_templates", "accuracy_heldout_templates"))
    # replacement inpainting and outpainting give back the known pixels exactly, trained or not
    assert on_disk["inpainting"]["known_max_abs_diff"] == 0.0
    assert on_disk["outpainting"]["known_max_abs_diff"] == 0.0 and on_disk["outpainting"]["canvas"] == [24, 24]
    assert on_disk["train"]["steps"] == 3 and on_disk["seconds"]["total"] > 0
    assert {"samples", "editing"} <= on_disk["files"].keys()
