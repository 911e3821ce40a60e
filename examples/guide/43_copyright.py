"""Chapter 43: dataset copyright, the technical tools: a memorization check and data provenance.

Samples the guide's digits model and asks of each sample whether it is a copy of a training digit
(Carlini et al. 2023's test, ``difflab.eval.memorization``), beside two controls: planted copies of
training digits (must be flagged) and real held-out digits (must not be). Then records the training
data's provenance as every difflab checkpoint does (``difflab.data.provenance``) and shows that the
record is the same on a second run and changes when one pixel of the data changes.
Draws samples beside their three nearest training digits, and the ratio each sample gets.
``python examples/guide/43_copyright.py [--fast --out DIR]`` (about 13 s on the 2-core CPU, the cached model included).
"""
from __future__ import annotations

import torch

import _guide as guide
from difflab.data.provenance import digits_source, provenance
from difflab.eval import memorization
from difflab.pipelines import generate

BOUNDS = {
    "planted_copies_flagged_rate": (1.0, 1.0),     # every planted training digit is caught
    "held_out_flagged_rate": (0.0, 0.0),           # no real held-out digit is called a copy
    "model_flagged_rate": (0.0, 0.1),              # the 80-step model does not copy its training digits
    "model_median_ratio": (0.8, 3.0),              # a sample's nearest digit is about as far as the next ones
    "held_out_median_ratio": (0.8, 3.0),
    "provenance_same_on_rerun": (1, 1),
    "provenance_changed_by_one_pixel": (1, 1),
}


def run(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    train, held = world["train"], world["held"]
    denoiser, _ = guide.digits_model(args.fast)
    n = 100 if args.fast else 300
    asked = torch.arange(n) % 10
    samples = generate(denoiser, asked.tolist(), shape=(1, 8, 8), steps=20 if args.fast else 50, seed=args.seed,
                       progress=False)

    # 1. The check on the model's samples and on two controls.
    g = torch.Generator().manual_seed(args.seed)
    planted = train[torch.randperm(len(train), generator=g)[:n]]
    found = {"model": memorization(samples, train), "planted": memorization(planted, train),
             "held": memorization(held, train)}

    # 2. Provenance: the record a checkpoint carries, twice, and after one pixel changes.
    data = {"images": train, "labels": world["train_labels"]}
    first, again = provenance(data, "digits"), provenance(data, "digits")
    changed = dict(data, images=train.clone())
    changed["images"][0, 0, 3, 3] += 0.125
    figures = guide.report({
        "model_flagged_rate": found["model"].rate, "model_median_ratio": float(found["model"].ratio.median()),
        "model_closer_than_train_rate": found["model"].closer_than_train_rate,
        "planted_copies_flagged_rate": found["planted"].rate,
        "held_out_flagged_rate": found["held"].rate, "held_out_median_ratio": float(found["held"].ratio.median()),
        "held_out_closer_than_train_rate": found["held"].closer_than_train_rate,
        "provenance_same_on_rerun": int(first == again),
        "provenance_changed_by_one_pixel": int(provenance(changed, "digits")["sha256"] != first["sha256"]),
    })
    print(f"provenance: {first['examples']} examples, sha256 {first['sha256'][:16]}..., "
          f"digits of scikit-learn {digits_source()['sklearn_version']}, raw sha256 {first['source']['raw_sha256'][:16]}...")

    # 3. The picture: ten samples (one per class, the nearest to a training digit) beside their
    # three nearest training digits, and the ratios of the three sets against the threshold.
    plt = guide.pyplot()
    fig = plt.figure(figsize=(10, 4.6))
    model = found["model"]
    for c in range(10):
        idx = (asked == c).nonzero().flatten()
        i = int(idx[model.ratio[idx].argmin()])
        near = torch.cdist(samples[i].reshape(1, -1), train.reshape(len(train), -1))[0].topk(3, largest=False).indices
        for row, (img, title) in enumerate([(samples[i], f"r={model.ratio[i]:.2f}")] +
                                           [(train[j], "train" if k else "nearest") for k, j in enumerate(near)]):
            ax = fig.add_subplot(4, 20, row * 20 + c + 1)
            ax.imshow(img[0], cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0 or row == 0:
                ax.set_title(title, fontsize=6)
    ax = fig.add_axes([0.56, 0.12, 0.42, 0.76])
    bins = torch.linspace(0, 3, 61)
    for name, label in (("model", "model samples"), ("held", "held-out digits"), ("planted", "planted copies")):
        ax.hist(found[name].ratio.clamp(max=3).numpy(), bins=bins.numpy(), alpha=0.6, label=label)
    ax.axvline(model.delta, color="k", lw=1, ls="--")
    ax.text(model.delta + 0.03, ax.get_ylim()[1] * 0.9, "flagged below", fontsize=7)
    ax.set(xlabel="nearest / (0.5 x mean of next 50)", ylabel="count"), ax.legend(fontsize=7)
    guide.save(fig, guide.picture(args, "43_copyright.png"))
    return figures


# run on one thread (the CPU seconds quoted are one thread's), torch's setting restored
main = guide.on_one_thread(run)


if __name__ == "__main__":
    main()
