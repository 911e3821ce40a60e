"""Chapter 12: timestep embeddings and their sinusoidal encoding.

Builds the sinusoidal embedding difflab's U-Net feeds its time MLP (``difflab.nn.layers.
timestep_embedding``, Vaswani et al. 2017 / Ho et al. 2020) and Gaussian Fourier features
(``difflab.nn.unet_sd.FourierFeatures``, NCSN++ / EDM), prints how similar the embeddings of
nearby and distant steps are, and trains the same tiny MLP denoiser on the 2-D ring mixture four
times, with the time fed as sinusoidal features, Fourier features, the raw scalar, or not at all,
printing each held-out loss beside the exact denoiser's floor. Draws the embedding matrix, the
cosine similarities between steps and the loss curves.
``python examples/guide/12_timestep_embeddings.py [--fast --out DIR]`` (28-30 CPU s; --fast 2.2 CPU s).
"""
from __future__ import annotations

import torch

import _basics
import _guide as guide
from difflab.core import Denoiser, VPDiscrete
from difflab.nn.layers import timestep_embedding
from difflab.nn.unet_sd import FourierFeatures
from difflab.train import diffusion_loss

BOUNDS = {
    "sinusoidal_cos_adjacent_min": (0.95, 0.99),  # steps t and t+1 embed alike, not identically (dim 64)
    "sinusoidal_cos_far": (0.2, 0.45),            # t = 0 and t = 999 embed differently
    "fourier_cos_adjacent_min": (0.999, 1.0),     # Fourier features of t/T with w ~ N(0, 1): smooth in t
    "loss_floor": (0.15, 0.3),                    # the exact eps-model's held-out eps-MSE
    "loss_sinusoidal": (0.2, 0.4),                # 120-step models
    "loss_none": (0.25, 0.6),                     # no time input: it must guess the noise level from x
    "gap_none_minus_sinusoidal": (0.02, 0.4),
}

EMBEDDINGS = ("sinusoidal", "fourier", "raw", "none")


@torch.no_grad()
def held_loss(denoiser, held: torch.Tensor, frame, seed: int) -> float:
    """L_simple (eps-MSE per coordinate) on held-out points at uniform steps, fixed draws."""
    g = torch.Generator().manual_seed(seed)
    sigma = frame.sigmas[torch.randint(0, frame.T, (len(held),), generator=g)]
    noise = torch.randn(held.shape, generator=g, dtype=held.dtype)
    return diffusion_loss(denoiser, held, sigma, noise).mean().item()


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    g = torch.Generator().manual_seed(args.seed)
    T, dim = 1000, 64
    t = torch.arange(T).double()
    sinus = timestep_embedding(t, dim)
    with torch.random.fork_rng():  # FourierFeatures draws its frequencies from torch's global generator
        torch.manual_seed(args.seed)
        fourier = FourierFeatures(dim // 2)
    four = fourier(t / T)  # NCSN++ feeds log sigma; here t in [0, 1), frequencies ~ N(0, 1)
    unit = lambda e: e / e.norm(dim=-1, keepdim=True)
    cos_s, cos_f = unit(sinus) @ unit(sinus).T, unit(four) @ unit(four).T
    figures = {"sinusoidal_cos_adjacent_min": cos_s.diagonal(1).min().item(),
               "sinusoidal_cos_far": cos_s[0, -1].item(),
               "fourier_cos_adjacent_min": cos_f.diagonal(1).min().item()}

    # 2. The same MLP, four ways of feeding it the time; eps-prediction on DDPM's linear schedule.
    gm = _basics.ring_mixture()
    frame = VPDiscrete.from_name("linear")
    steps = 120 if args.fast else 2000
    data = gm.sample(20_000, g).float()
    held = gm.sample(1000 if args.fast else 20_000, g).float()
    figures["loss_floor"] = held_loss(Denoiser(gm.network(frame, "eps"), frame, "eps"), held, frame, args.seed + 7)
    curves = {}
    for emb in EMBEDDINGS:
        scale = 1.0 if emb == "sinusoidal" else 1 / T  # the U-Net's step index; [0, 1) for the others
        model = Denoiser(_basics.ToyNet(emb, t_scale=scale, seed=args.seed), frame, "eps")
        curves[emb] = _basics.train_toy(model, data, steps, seed=args.seed)
        figures[f"loss_{emb}"] = held_loss(model.eval(), held, frame, args.seed + 7)
    figures["gap_none_minus_sinusoidal"] = figures["loss_none"] - figures["loss_sinusoidal"]
    figures = guide.report(figures)

    # 3. The picture: the embedding matrix, cosine similarity between steps (both embeddings), loss curves.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6), constrained_layout=True)
    axes[0].imshow(sinus.T, aspect="auto", cmap="RdBu", interpolation="nearest")
    axes[0].set(xlabel="step t", ylabel="channel (cos | sin)", title="sinusoidal embedding, dim 64")
    for ax, cos, name in ((axes[1], cos_s, "sinusoidal"), (axes[2], cos_f, "Fourier (w ~ N(0,1), t/T)")):
        im = ax.imshow(cos, cmap="viridis", vmin=-1, vmax=1, origin="lower")
        ax.set(xlabel="step t", ylabel="step t'", title=f"cos similarity, {name}")
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    k = max(1, steps // 50)
    for emb, c in curves.items():
        smooth = torch.tensor(c).unfold(0, k, k).mean(1) if len(c) >= k else torch.tensor(c)
        axes[3].plot(range(k, k * len(smooth) + 1, k), smooth, label=emb)
    axes[3].axhline(figures["loss_floor"], color="gray", ls="--", label="exact model")
    top = max(c[len(c) // 10] for c in curves.values())
    axes[3].set(xlabel="training step", ylabel="eps-MSE", ylim=(0.9 * figures["loss_floor"], 1.2 * top), title="training loss")
    axes[3].legend(fontsize=7)
    guide.save(fig, guide.picture(args, "12_timestep_embeddings.png"))
    return figures


main = guide.on_one_thread(run)  # one thread: small operations, CPU seconds quoted for one

if __name__ == "__main__":
    main()
