import torch

# The suite's networks are tiny: one thread is faster than two fighting over a small CPU.
torch.set_num_threads(1)


import pytest  # noqa: E402

# The longest file first: under pytest-xdist (pyproject's addopts) one worker starts it at once while
# the others work through the rest, instead of it starting last on its own.
FIRST = ("test_guide.py",)


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name not in FIRST)  # stable: the order within files is kept


@pytest.fixture(scope="session")
def digits_judge_file(tmp_path_factory):
    """The default digits judge (``DigitsJudge.fit()``: about 10 s), trained once per test run and
    saved; tests that need the full judge load it instead of training their own."""
    from difflab.eval import DigitsJudge

    path = tmp_path_factory.mktemp("judge") / "digits_judge.safetensors"
    DigitsJudge.fit().save(path)
    return path


@pytest.fixture(scope="session")
def studio_models(tmp_path_factory):
    """A models folder for difflab studio's tests: ``digits`` (the tiny preset trained for 30 steps
    on 8x8 digits, a few seconds) and ``text16`` (a random latent text model of the text demo's
    layout, 16x16, that img2img, inpainting, outpainting and inversion run on)."""
    import dataclasses
    import json

    from difflab.cli import main
    from difflab.core import Denoiser
    from difflab.demos import text as dt
    from difflab.io.text_model import save_text_model
    from difflab.nn.text import build_vocab

    root = tmp_path_factory.mktemp("studio") / "models"
    root.mkdir()
    cfg = root.parent / "config.json"
    cfg.write_text(json.dumps({"train": {"steps": 30, "batch_size": 32, "checkpoint_every": 30, "progress": False}}))
    assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(root / "digits")]) == 0
    tiny = dataclasses.replace(dt.DEMO, vae_channels=(8, 16, 16), text_width=16, text_layers=1, unet_channels=16)
    vocab = build_vocab([dt.caption(d, t) for d in range(10) for t in dt.TRAIN_TEMPLATES])
    vae, text, net, denoiser = dt.build_models(tiny, vocab)
    spec = {"network": {"kind": "unet", "config": net.unet.config.to_dict()}, "diffusion": dt.DIFFUSION}
    save_text_model(root / "text16", Denoiser(net.unet, denoiser.frame, "v"), text, spec, {"demo": "text", "size": 16},
                    vae=vae, sampling={"sampler": "ddim", "steps": 4, "guidance_scale": 2.0, "height": 16, "width": 16})
    return root
