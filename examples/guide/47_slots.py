"""Chapter 47: slot diffusion and object compositionality (Slot Attention; SlotDiffusion; LSD).

A slot-attention encoder turns a scene into K slot vectors; a small U-Net decoder cross-attends to
them and is trained by the diffusion loss alone (the encoder learns only through it). After a tiny
run, the encoder's attention masks are scored by FG-ARI on held-out scenes beside trivial
segmentations (everything one segment; two vertical stripes; the untrained encoder), on all
scenes and on those of two or more objects (where one segment scores 0), and a few scenes
are decoded from their own slots and with one object's slot switched off.
``python examples/guide/47_slots.py [--fast --out DIR]`` (full: 39 CPU s on one thread of the 2-core CPU;
the fast run 7.5 CPU s with the imports).
"""
from __future__ import annotations

import tempfile

import torch

import _guide as guide
from difflab.core import Denoiser
from difflab.data.scenes import load_scenes
from difflab.eval.scene_metrics import fg_ari
from difflab.io.spec import build_frame
from difflab.nn.slot_attention import SlotConfig, SlotEncoder, SlotUNet
from difflab.nn.unet import UNet, UNetConfig
from difflab.pipelines.slots import decode_slots, encode_slots, remove_slot, segment
from difflab.train import TrainConfig, train

BOUNDS = {
    "one_segment_fg_ari": (0.2, 0.5),          # one segment: ARI 1 on each one-object scene, 0 on the others
    "one_segment_fg_ari_multi": (0.0, 0.0),    # on scenes of 2-3 objects: 0
    "true_fg_ari": (1.0, 1.0),                 # the true segmentation scores 1
    "masks_sum_error": (0.0, 1e-5),            # slot masks partition each pixel (softmax over slots)
    "trained_fg_ari": (-0.2, 1.0),             # the tiny run: any value is honest, it must be finite
    "removed_change": (0.0, 2.0),              # how much switching a slot off changes the decoded image
}
SIZE, K = 16, 4
DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}


def slot_model(seed: int) -> Denoiser:
    """A small slot-diffusion denoiser: K = 4 slots of 32 dims, a 16-channel U-Net decoder."""
    slots = SlotConfig(in_channels=3, size=SIZE, num_slots=K, slot_dim=32, iters=3, hidden=32, mlp_hidden=64)
    unet = UNetConfig(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                      num_heads=2, context_dim=slots.slot_dim)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = SlotUNet(SlotEncoder(slots), UNet(unet))
    return Denoiser(net, build_frame(DIFFUSION), DIFFUSION["prediction"])


def stripes(n: int, k: int) -> torch.Tensor:
    """The trivial segmentation by position: k vertical stripes, (n, SIZE, SIZE)."""
    cols = (torch.arange(SIZE) * k // SIZE).view(1, 1, SIZE)
    return cols.expand(n, SIZE, SIZE).clone()


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    torch.manual_seed(args.seed)
    train_set = load_scenes(400 if args.fast else 6000, size=SIZE, split="train", max_objects=3)
    held = load_scenes(60 if args.fast else 300, size=SIZE, split="test", max_objects=3)   # the demo's 300
    truth = held.segmentation()
    n = len(held.images)

    # 1. Trivial segmentations and the untrained encoder.
    denoiser = slot_model(args.seed)
    _, masks0 = encode_slots(denoiser, held.images, seed=args.seed)
    multi = held.counts >= 2
    one = torch.zeros_like(truth)
    figures = {"one_segment_fg_ari": fg_ari(one, truth), "one_segment_fg_ari_multi": fg_ari(one[multi], truth[multi]),
               "true_fg_ari": fg_ari(truth, truth), "stripes2_fg_ari": fg_ari(stripes(n, 2), truth),
               "stripes2_fg_ari_multi": fg_ari(stripes(n, 2)[multi], truth[multi]),
               "untrained_fg_ari": fg_ari(segment(masks0), truth),
               "untrained_fg_ari_multi": fg_ari(segment(masks0)[multi], truth[multi]),
               "masks_sum_error": (masks0.sum(1) - 1).abs().max().item()}

    # 2. Train encoder and decoder together by the diffusion loss (the clean image is a keyword).
    config = TrainConfig(steps=3 if args.fast else 150, batch_size=32, lr=1e-3, warmup_steps=2 if args.fast else 30,
                         ema_decay=None, checkpoint_every=0, log_every=10_000, progress=False, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        train(denoiser, (train_set.images, None, {"image": train_set.images}), config, tmp)
    denoiser.eval()
    slots, masks = encode_slots(denoiser, held.images, seed=args.seed)
    figures["trained_fg_ari"] = fg_ari(segment(masks), truth)
    figures["trained_fg_ari_multi"] = fg_ari(segment(masks)[multi], truth[multi])

    # 3. Decode 8 scenes from their own slots, and with the slot holding most of object 1 switched off.
    k = 8
    opts = dict(sampler="ddim", steps=3 if args.fast else 25, seed=args.seed, progress=False, size=SIZE)
    recon = decode_slots(denoiser, slots[:k], **opts)
    owner = torch.einsum("nkhw,nhw->nk", masks[:k], held.masks[:k, 0].float()).argmax(1)
    removed = decode_slots(denoiser, slots[:k], slot_mask=remove_slot(torch.ones(k, K, dtype=torch.bool), owner), **opts)
    figures["recon_rmse"] = float(((recon - held.images[:k]) ** 2).mean().sqrt())
    figures["removed_change"] = float((removed - recon).abs().mean())
    figures = guide.report(figures)

    # 4. The picture: scenes, true segments, slot masks, reconstructions, one slot removed.
    plt = guide.pyplot()
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.3, 0.3], [0.3, 0.8, 0.3], [0.3, 0.4, 0.9], [0.9, 0.9, 0.3]])
    rows = {"scene": (held.images[:k] + 1) / 2, "true segments": palette[truth[:k]].permute(0, 3, 1, 2),
            "slot masks (argmax)": palette[1:][segment(masks[:k])].permute(0, 3, 1, 2),
            "decoded from slots": (recon + 1) / 2, "object 1's slot off": (removed + 1) / 2}
    fig, axes = plt.subplots(len(rows), k, figsize=(8, 5.6))
    for r, (name, x) in enumerate(rows.items()):
        for c in range(k):
            axes[r, c].imshow(x[c].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle(f"Slot diffusion after {config.steps} steps: FG-ARI {figures['trained_fg_ari']:.2f} "
                 f"(one segment {figures['one_segment_fg_ari']:.2f}, two stripes {figures['stripes2_fg_ari']:.2f})", fontsize=9)
    guide.save(fig, guide.picture(args, "47_slots.png"))
    return figures


if __name__ == "__main__":
    main()
