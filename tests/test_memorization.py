"""The memorization check (difflab.eval.memorization, Carlini et al. 2023): planted copies of training
digits are flagged, held-out digits and noise are not, a real difflab model's samples are reported;
`difflab eval --memorization` prints it."""
import json

import torch

from difflab.cli import main
from difflab.data import load_digits
from difflab.eval import DigitsJudge, FitConfig, memorization
from difflab.io.spec import build_denoiser
from difflab.pipelines import sample_checkpoint
from difflab.train import TrainConfig, train

TRAIN, _ = load_digits(split="train")
HELD, _ = load_digits(split="test")


def test_planted_copies_are_flagged_and_found():
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(TRAIN), generator=g)[:100]
    copies = TRAIN[pick] + 0.01 * torch.randn(100, 1, 8, 8, generator=g)  # copies with a little noise
    found = memorization(copies, TRAIN)
    assert found.rate == 1.0 and found.closer_than_train_rate == 1.0
    assert torch.equal(found.nearest, pick)                                 # each copy points to its source
    assert float(found.ratio.max()) < 0.2


def test_half_copies_half_held_out_flags_exactly_the_copies():
    mixed = torch.cat([TRAIN[:50], HELD[:50]])
    found = memorization(mixed, TRAIN)
    assert found.flagged.tolist() == list(range(50)) and found.rate == 0.5
    assert float(found.ratio[:50].max()) == 0.0


def test_held_out_digits_and_noise_are_not_flagged():
    held = memorization(HELD, TRAIN)
    assert held.rate == 0.0
    assert held.closer_than_train_rate < 0.05                              # about the 1% quantile it is measured at
    noise = memorization(torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1, TRAIN)
    assert noise.rate == 0.0 and float(noise.ratio.min()) > 1.0


def test_a_trained_model_is_reported_by_difflab_eval(tmp_path, capsys):
    spec = {"unet": {"in_channels": 1, "model_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                     "attention_levels": [], "num_heads": 1, "groups": 4, "num_classes": 10},
            "diffusion": {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "eps"}}
    images, labels = load_digits(split="train")
    train(build_denoiser(spec, seed=0), (images, labels), TrainConfig(steps=30, batch_size=32, checkpoint_every=0,
          log_every=0, progress=False), tmp_path / "run", spec=spec)
    samples = sample_checkpoint(tmp_path / "run", labels="balanced", num=40, steps=5, seed=0, progress=False)
    found = memorization(samples, TRAIN)
    assert len(found.ratio) == 40 and 0.0 <= found.rate <= 1.0 and torch.isfinite(found.ratio).all()
    assert found.rate < 0.5                                                  # 30 steps do not memorize
    DigitsJudge.fit(fit_config=FitConfig(epochs=1)).save(judge := tmp_path / "judge.safetensors")
    assert main(["eval", "--generated", str(tmp_path / "run"), "--reference", "digits", "--num", "40", "--steps", "5",
                 "--weights", str(judge), "--metrics", "fid", "--memorization", "digits", "--json", "--no-progress",
                 "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)["memorization"]
    assert out["samples"] == 40 and out["memorized_rate"] == found.rate
