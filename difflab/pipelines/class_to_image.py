"""Class-conditional (or unconditional) generation: labels in, images out."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..core import SampleNoise, grids
from ..guidance import ClassifierFreeGuidance
from ..samplers import get_sampler


@torch.no_grad()
def generate(
    denoiser,
    labels=None,
    *,
    num_samples: int | None = None,
    shape: tuple[int, ...],
    sampler: str = "ddim",
    steps: int = 50,
    grid: str = "default",
    spacing: str = "trailing",
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    progress: bool = True,
    **sampler_kwargs,
) -> torch.Tensor:
    """Generate images for class ``labels`` (a sequence of ints) or ``num_samples`` unconditional
    images with classifier-free guidance ``guidance_scale`` (1 = no guidance).

    Sample i is drawn from its own generator seeded by (``seed``, i), so it is the same image
    whatever ``batch_size`` is. Returns (N, *shape) in the model's data range, clamped to [-1, 1].
    """
    # 1. Check inputs.
    sample = get_sampler(sampler)
    num_classes = getattr(getattr(denoiser.net, "config", None), "num_classes", None)
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if num_classes is None:
            raise ValueError("labels were given but the model is unconditional (its config has no num_classes)")
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise ValueError(f"class labels must be in [0, {num_classes - 1}], got {bad.tolist()}")
        n = len(labels)
    else:
        if num_samples is None or num_samples < 1:
            raise ValueError("give labels, or num_samples >= 1 for unconditional generation")
        n = num_samples
    null_class = num_classes if null_class is None else null_class
    if guidance_scale != 1.0 and labels is None:
        raise ValueError("guidance_scale != 1 needs class labels to guide towards")

    # 2. Build the grid.
    sigmas = grids.for_denoiser(denoiser, steps, grid=grid, spacing=spacing).to(device, torch.float32)

    out = []
    bar = tqdm(total=n, desc=f"sampling ({sampler}, {steps} steps)", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        # 3. Draw per-sample noise: sample i has its own generator.
        noise = SampleNoise.for_run(seed, b, shape, start=start, device=device)
        # 4. Scale it to the prior at the first level.
        x = noise() * float(denoiser.prior_std(sigmas[0].double()))
        # 5. Wrap the denoiser with guidance: the unconditional branch sees the null class.
        model, extra = denoiser, {}
        if labels is not None:
            extra["class_labels"] = labels[start:start + b].to(device)
            if guidance_scale != 1.0:
                uncond = {"class_labels": torch.full((b,), null_class, dtype=torch.long, device=device)}
                model = ClassifierFreeGuidance(denoiser, guidance_scale, uncond=uncond)
        # 6. Run the sampler.
        x = sample(model, x, sigmas, noise=noise, extra_args=extra, **sampler_kwargs)
        out.append(x.clamp(-1, 1).cpu())
        bar.update(b)
    bar.close()
    # 7. Return in the data range.
    return torch.cat(out)
