"""Chapter 40: evaluation metrics, CLIP-FID among them.

With the digits judge as the feature network (64-d features, 10-class logits), computes
difflab.eval's Frechet distance (FID's formula), KID, precision/recall and the Inception Score
of five sets against the held-out digits: real training digits, the guide model's samples, and
the training digits blurred, noised (sigma 0.5), or all of one class. Shows each metric's small-sample bias
(Frechet distance and KID of real vs real as n grows). CLIP-FID is the same Frechet distance on
CLIP image features; no CLIP weights exist offline, so the example saves a tiny random-weight
transformers ``CLIPModel`` and runs difflab's CLIP extractor through it: plumbing only.
``python examples/guide/40_metrics.py [--fast --out DIR]`` (17 CPU s beyond the cached model; --fast 2.5 CPU s).
"""
from __future__ import annotations

import tempfile

import torch
import torch.nn.functional as F

import _basics
import _guide as guide
from difflab.eval import clip_fid, fid, inception_score, kid, load_extractor, precision_recall

BOUNDS = {
    "fd_real": (20.0, 120.0),            # training digits vs held-out (fast: 60 of each)
    "fd_blurred": (60.0, 5000.0),        # a 3x3 blur moves every feature
    "fd_noised": (70.0, 5000.0),
    "recall_one_class": (0.0, 0.3),      # one class of ten: precise but covers little
    "precision_one_class": (0.5, 1.0),
    "kid_real": (-300.0, 300.0),         # unbiased: about 0 for real vs real (raw units of 64-d judge features)
    "kid_blurred": (1000.0, 1e5),
    "fd_bias_small_n": (1.05, 5.0),      # FD(real, real) at n = 30 over FD at the largest n: biased upwards
    "clip_fid_random_weights": (0.0, 1e6),  # plumbing only (random weights): finite and non-negative
}


def blur(images: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial blur (edges replicated)."""
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None, :] / 16).reshape(1, 1, 3, 3)
    return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), k)


def tiny_random_clip(folder: str) -> str:
    """A CLIPModel with random weights (2 layers, width 32, 8x8 images), saved like a real one."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "vocab_size": 100, "max_position_embeddings": 16},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    CLIPModel(config).save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    with guide.threads(1), torch.random.fork_rng():  # tiny_random_clip seeds torch's global generator
        return run(args)


def run(args) -> dict:
    world = guide.digits_world()
    judge, held = world["judge"], world["held"]
    n = 60 if args.fast else len(held)  # 359 held-out digits
    g = torch.Generator().manual_seed(args.seed)
    train = world["train"][torch.randperm(len(world["train"]), generator=g)]
    real = train[:n]
    denoiser, _ = guide.digits_model(args.fast)
    labels = torch.arange(n) % 10
    samples = _basics.sample_digits(denoiser, labels, _basics.discrete_grid(denoiser.frame, 10 if args.fast else 50),
                                    "ddim", args.seed)
    ones = world["train"][world["train_labels"] == 1][:n]
    sets = {"real": real, "model": samples, "blurred": blur(real),
            "noised": (real + 0.5 * torch.randn(real.shape, generator=g)).clamp(-1, 1), "one_class": ones}
    ref = judge.features(held[:n])
    figures = {}
    for name, images in sets.items():
        feats = judge.features(images)
        figures[f"fd_{name}"] = fid(feats, ref)
        figures[f"kid_{name}"] = kid(feats, ref, subsets=20 if args.fast else 100)[0]
        figures[f"precision_{name}"], figures[f"recall_{name}"] = precision_recall(ref, feats)
        figures[f"is_{name}"] = inception_score(judge.logits(images), splits=1)[0]

    # Small-sample bias: real (train) vs real (held-out), n growing. FD's plug-in estimate is biased up; KID is not.
    sizes = (30, 60) if args.fast else (30, 60, 120, 240, 359)
    bias = {"fd": [], "kid": []}
    for m in sizes:
        a, b = judge.features(train[-m:]), judge.features(held[:m])
        bias["fd"].append(fid(a, b))
        bias["kid"].append(kid(a, b, subsets=20 if args.fast else 100)[0])
        figures[f"fd_real_n{m}"], figures[f"kid_real_n{m}"] = bias["fd"][-1], bias["kid"][-1]
    figures["fd_bias_small_n"] = bias["fd"][0] / bias["fd"][-1]

    # CLIP-FID: the Frechet distance on CLIP image embeddings (Kynkaanniemi et al. 2023). Random weights here.
    with tempfile.TemporaryDirectory() as folder:
        clip = load_extractor("clip", tiny_random_clip(folder))
        with torch.no_grad():
            figures["clip_fid_random_weights"] = clip_fid(clip(samples).double(), clip(held[:n]).double())
    figures = guide.report(figures)

    # The picture: each metric for each set; FD and KID against n.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), constrained_layout=True)
    names = list(sets)
    for ax, metric, log in ((axes[0], "fd", True), (axes[1], "precision", False), (axes[1], "recall", False)):
        vals = [figures[f"{metric}_{s}"] for s in names]
        ax.bar([i + (0.2 if metric == "recall" else -0.2 if metric == "precision" else 0) for i in range(len(names))], vals,
               width=0.4 if metric != "fd" else 0.7, label=metric)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        if log:
            ax.set_yscale("log")
    axes[0].set_title("judge Frechet distance to held-out"), axes[1].set_title("precision / recall (k = 3)")
    axes[1].legend(fontsize=8)
    axes[2].plot(sizes, bias["fd"], "o-")
    axes[2].set(xlabel="n (each side)", ylabel="FD, real vs real", title="FD's small-sample bias")
    axes[3].plot(sizes, bias["kid"], "o-")
    axes[3].axhline(0, color="gray", lw=0.5)
    axes[3].set(xlabel="n (each side)", ylabel="KID, real vs real", title="KID is unbiased")
    guide.save(fig, guide.picture(args, "40_metrics.png"))
    return figures


if __name__ == "__main__":
    main()
