"""Text-to-image models on disk (difflab.io.text_model) and from folders (difflab.pipelines.folder):
the file round-trips a latent model exactly, `difflab distill --method lcm|lcm-lora` turns one into
a few-step student that `difflab sample --model` samples with the LCM sampler by default, the
LCM-LoRA student is the base model plus a diffusers-layout adapter, and distillation resumes exactly."""
import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from difflab.cli import main
from difflab.core import Denoiser
from difflab.demos import text as dt
from difflab.io import load_checkpoint
from difflab.io.text_model import is_text_model, read_text_model, save_text_model
from difflab.nn.text import build_vocab
from difflab.pipelines.folder import load_text_model, model_family, model_options, sample_folder, sample_text_model

TINY = dataclasses.replace(dt.DEMO, vae_channels=(8, 16, 16), text_width=16, text_layers=1, unet_channels=16)
SPEC = {"network": {"kind": "unet", "config": None}, "diffusion": dt.DIFFUSION}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A random latent text model in the text demo's layout, written as the demo writes it."""
    vocab = build_vocab([dt.caption(d, t) for d in range(10) for t in dt.TRAIN_TEMPLATES])
    vae, text, net, denoiser = dt.build_models(TINY, vocab)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("teacher")
    spec = {**SPEC, "network": {"kind": "unet", "config": net.unet.config.to_dict()}}
    save_text_model(folder, Denoiser(net.unet, denoiser.frame, "v"), text, spec,
                    {"demo": "text", "data": "captioned_digits", "size": 16}, vae=vae,
                    sampling={"sampler": "ddim", "steps": 3, "guidance_scale": 2.0, "height": 16, "width": 16})
    return folder


def test_the_file_round_trips_a_latent_model(teacher):
    model = read_text_model(teacher)
    assert is_text_model(teacher) and model_family(teacher) == "difflab"
    assert model.vae is not None and model.sampling["guidance_scale"] == 2.0 and model.meta["size"] == 16
    tensors, _ = load_checkpoint(teacher / "model.safetensors")
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "vae"}
    for name, module in (("unet", model.denoiser.net), ("text_encoder", model.text_encoder), ("vae", model.vae)):
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, tensors[f"{name}.{k}"], rtol=0, atol=0)
    images = sample_text_model(model, ["the digit 3", "a seven"], options=model_options(model).replace(steps=2))
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()


def test_an_unknown_folder_is_refused_by_name(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "KandinskyPipeline"}')
    with pytest.raises(ValueError, match="KandinskyPipeline"):
        model_family(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a folder"):
        model_family(tmp_path / "nope")


def _distill(teacher, out, method, steps, *extra):
    argv = ["distill", "--method", method, "--teacher", str(teacher), "--out", str(out), "--steps", str(steps),
            "--batch-size", "8", "--lr", "1e-3", "--no-progress", "--device", "cpu", *extra]
    assert main(argv) == 0


def test_lcm_student_samples_with_its_own_defaults(teacher, tmp_path, capsys):
    out = tmp_path / "lcm"
    _distill(teacher, out, "lcm", 3)
    student = read_text_model(out)
    assert student.sampling == {"sampler": "lcm", "grid": "lcm", "steps": 4, "guidance_scale": 2.0, "height": 16,
                                "width": 16}
    assert student.meta["spec"]["student"]["consistency"] == {"form": "lcm"}
    assert type(student.denoiser).__name__ == "ConsistencyFunction"
    capsys.readouterr()
    assert main(["sample", "--model", str(out), "--prompt", "the digit 3", "--prompt", "a seven", "--num", "2",
                 "--out", str(tmp_path / "lcm.png"), "--device", "cpu"]) == 0
    assert "difflab model" in capsys.readouterr().out and (tmp_path / "lcm.png").exists()
    loaded = load_text_model(out)
    explicit = sample_text_model(loaded, ["the digit 3"], options=model_options(loaded).replace(
        sampler="lcm", grid="lcm", steps=4, guidance_scale=2.0, progress=False))
    torch.testing.assert_close(sample_folder(out, ["the digit 3"], progress=False), explicit, rtol=0, atol=0)


def test_lcm_lora_student_is_the_base_plus_an_adapter(teacher, tmp_path):
    out = tmp_path / "lora"
    _distill(teacher, out, "lcm-lora", 2, "--rank", "4")
    adapter = load_file(out / "lcm_lora.safetensors")  # diffusers' layout, no difflab header
    assert adapter and all(k.startswith("unet.") and ".lora_" in k for k in adapter)
    base, student = read_text_model(teacher), read_text_model(out)
    for k, v in base.denoiser.net.state_dict().items():  # the student file keeps the base weights untouched
        torch.testing.assert_close(student.denoiser.net.state_dict()[k], v, rtol=0, atol=0)
    plugged = load_text_model(out)
    assert type(plugged.denoiser).__name__ == "ConsistencyFunction" and plugged.sampling["guidance_scale"] == 1.0
    x, sigma = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([3.0, 0.5])
    cond = {"context": torch.randn(2, 5, 16), "context_mask": torch.ones(2, 5, dtype=torch.bool)}
    trained = any(v.abs().max() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert trained  # the adapter moved off its zero init, so plugging it in changes the outputs
    assert not torch.allclose(plugged.denoiser.denoiser(x, sigma, **cond), base.denoiser(x, sigma, **cond))


def test_lcm_distillation_resumes_exactly(teacher, tmp_path):
    _distill(teacher, tmp_path / "once", "lcm", 4)
    _distill(teacher, tmp_path / "twice", "lcm", 2)
    _distill(teacher, tmp_path / "twice", "lcm", 4)  # the run of 2 steps goes on to 4
    a, _ = load_checkpoint(tmp_path / "once" / "model.safetensors")
    b, _ = load_checkpoint(tmp_path / "twice" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
