"""What the modality chapters of the guide (22 video, 24 audio, 36 spectrograms, 39 mixture of
experts, 48 motion, 49 policies) share: a seeded tiny training through ``difflab.train`` that returns
the EMA denoiser, its CPU seconds and its loss log, and the audio world (clips and a cached audio judge)."""
from __future__ import annotations

import time

import torch

import _guide as guide


def fit(spec: dict, data, *, steps: int, batch_size: int, lr: float = 2e-3, seed: int = 0, cfg_dropout: float = 0.1,
        ema_decay: float = 0.99, folder=None, null_cond=None, **train) -> tuple:
    """Build ``spec``'s denoiser (seeded) and train it ``steps`` AdamW steps on ``data`` (the forms
    :func:`difflab.train.train` takes); returns ``(EMA denoiser in eval mode, CPU seconds)``."""
    import tempfile

    from difflab.io.spec import build_denoiser
    from difflab.train import TrainConfig
    from difflab.train import train as run

    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10), ema_decay=ema_decay,
                         cfg_dropout=cfg_dropout, checkpoint_every=0, log_every=max(1, steps // 10), progress=False, seed=seed, **train)
    denoiser = build_denoiser(spec, seed=seed)
    c0 = time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        state = run(denoiser, data, config, folder or tmp, spec=spec, null_cond=null_cond)
    state.ema.copy_to(denoiser.net)
    return denoiser.eval(), time.process_time() - c0, [float(e["loss"]) for e in state.history]


def audio_world(fast: bool, per_class: int = 120) -> dict:
    """The embedded audio clips (train and held out) and the audio judge, trained once and cached
    (``fast``: 3 epochs instead of the demo's 12)."""
    from safetensors.torch import load_file, save_file

    from difflab.data.audio import load_audio
    from difflab.eval.audio_judge import AudioJudge, AudioJudgeConfig

    clips, labels = load_audio("train", per_class=per_class)
    held, held_labels = load_audio("test", per_class=per_class)
    config = AudioJudgeConfig(epochs=3 if fast else 12)
    path = guide.cache_dir() / f"audio_judge_e{config.epochs}_p{per_class}.safetensors"
    if path.exists():
        judge = AudioJudge(config)
        judge.load_state_dict(load_file(str(path)))
        judge.eval()
    else:
        judge = AudioJudge.fit(clips, labels, config)
        save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path))
    return {"judge": judge, "train": clips, "train_labels": labels, "held": held, "held_labels": held_labels}


def balanced(clips: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    """About ``n`` of ``clips``, the same number of each class (the real floor of a Frechet distance
    must have the generated set's class mix, not the first classes of a sorted split)."""
    classes = labels.unique()
    per = max(1, n // len(classes))
    return torch.cat([clips[labels == c][:per] for c in classes])
