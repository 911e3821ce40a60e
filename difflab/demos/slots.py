"""`difflab demo --slots`: object-centric slot diffusion on the embedded scenes
(:mod:`difflab.data.scenes`, 16x16, 1-3 objects). Plain slot attention (Locatello et al. 2020)
with its mixture decoder (:class:`~difflab.nn.slot_attention.SlotAutoencoder`) trains by
reconstruction; after its first ``PRETRAIN_STEPS`` steps its encoder is handed, frozen, to a
U-Net decoder cross-attending to the slots (SlotDiffusion, Wu et al. 2023; LSD, Jiang et al.
2023; :class:`difflab.nn.slot_attention.SlotUNet`) trained through the one training loop by the
diffusion loss, while the baseline goes on for the same CPU time. With ``MIXTURE_HINT`` the U-Net
also sees the frozen mixture decoder's render of the slots (the kept ones after an edit) as input
channels, and decodes by Euler ancestral sampling (``SAMPLER``); docs/slots.md has the figures. Then:

- object discovery: FG-ARI of the slot masks against the true object masks, held-out scenes;
- reconstruction: images decoded from their own slots;
- composition: a slot of an object removed (the judge should count one object fewer), a slot
  swapped in from another scene (the judge should find the new object's colour), a slot added;
  with ``LOCALISED`` the removal and the swap also regenerated only inside the slots' masks, the
  rest of the scene kept (RePaint-style; both figures reported, labelled); with ``OBJECT_SHARE`` an
  object's edit takes all the slots that hold it (:func:`object_slot_sets`), with ``REMOVAL =
  "localised"`` the removal figure is the localised one; ``EDIT_PAIRS`` trains the decoder on
  slot-edit pairs with re-rendered targets (:func:`edit_pairs`).

Writes ``decomposition.png`` (images, slot masks, reconstructions), ``composition.png``
(originals, one slot removed, one slot swapped) and ``report.json``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..data.scenes import COLOURS, PALETTE, load_scenes, rerender_scenes
from ..eval.scene_judge import colour_presence
from ..eval.scene_metrics import fg_ari
from ..io.images import save_grid
from ..nn.slot_attention import SlotAutoencoder, SlotConfig, SlotEncoder, SlotUNet
from ..nn.unet import UNet, UNetConfig
from ..core import Denoiser
from ..io.spec import build_frame
from ..pipelines.slots import add_slot, decode_slots, edit_region, encode_slots, remove_slot, segment, swap_slot_sets, swap_slots
from ..train import TrainConfig, train
from .depth import MAX_OBJECTS, SIZE, judge_step

TRAIN_SCENES, HELD_SCENES = 6000, 300
# K = MAX_OBJECTS + 4 slots (stop 40; + 2 until then): two objects share a top slot in 22 of the 198 removal scenes, not
# 25, and one thread reads removal 83.8% -> 85.9%, swap 85.3% -> 86.7%, FG-ARI 0.841 -> 0.816 (+ 3: FG-ARI 0.778);
# +30 CPU s (docs/slots.md, stop 40); within the draw: with seed 1, K = 5 shares 17, K = 7 23. 3x3 features collapsed
# (FG-ARI 0.32); 5 iterations bound worse (31 shared); position x0.2: FG-ARI 0.70.
SLOTS = SlotConfig(in_channels=3, size=SIZE, num_slots=MAX_OBJECTS + 4, slot_dim=64, iters=3, hidden=64, mlp_hidden=128,
                   kernel_size=1, decoder_kernel_size=1, center_keys=True, position_scale=0.1)
UNET = UNetConfig(in_channels=3, model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                  num_heads=4, context_dim=SLOTS.slot_dim)
TRAIN = TrainConfig(steps=900, batch_size=32, lr=1e-3, warmup_steps=100, ema_decay=None, checkpoint_every=750,
                    log_every=250, seed=0)
PRETRAIN_STEPS = 1000  # the encoder's first steps, with the mixture decoder (the baseline's own first steps); 1,500 bind
# better (18 shared top slots of 198, K = 5) but FG-ARI falls to 0.79 (2,000: 0.72; stop 40)
JUDGE_STEPS = 800
SAMPLER = "euler_ancestral"  # decoding; its re-noising clears the speckle DDIM keeps (docs/slots.md)
MIXTURE_HINT = True  # the diffusion decoder also sees the pretrained mixture decoder's render of the slots
LOCALISED = False  # also judge the edits regenerated only where they act (stop 38: removal 35% -> 74%, swap 80%: short of 85%)
# An object's slots (stop 39): its top slot and every other slot holding >= OBJECT_SHARE of its attention (None: the top
# slot only, stops 32-38). Removal: the removal decoded "whole" (the scene anew) or "localised" (only the removed slots' region).
OBJECT_SHARE = 0.1  # stop 39, one thread, K = 5: swap 80.0% -> 85.3%, with REMOVAL "localised" removal 35.4% -> 83.8% (two
# threads: 81.7%, 80.3%); stop 40, K = 7: 86.7%, 85.9% (one thread)
REMOVAL = "localised"
RECON_SCENES = None  # the reconstructions judged: the first RECON_SCENES held-out scenes (None: all)
# A localised edit's region (the slot's attention > 0.3) grown by LOCALISED_DILATE pixels, and its RePaint passes a
# step, (removal, swap): removal 0 px / 2 passes 74% (1 px: 67%; 1 px, 1 pass: 60%), swap 1 px / 1 pass 80% (0 px: 72%)
LOCALISED_DILATE = (0, 1)
LOCALISED_RESAMPLE = (2, 1)
# Slot-edit training pairs (stop 39): a fraction of the training scenes also appears (removal) with one object's slot
# left out and, as the target, the scene re-rendered without that object, and (swap) with one object's slot replaced by
# another scene's object's slot and the scene re-rendered with that object in its place; 0, 0: the plain decoder.
EDIT_PAIRS = (0.0, 0.0)
DIFFUSION = {"frame": "vp_discrete", "schedule": "cosine", "T": 1000, "prediction": "v"}


def slot_denoiser(slots: SlotConfig = SLOTS, unet: UNetConfig = UNET, seed: int = 0, mixture_hint: bool = False) -> Denoiser:
    """The slot-diffusion denoiser: a :class:`SlotUNet` in DDPM's cosine VP frame, v-prediction;
    ``mixture_hint``: the U-Net also sees the mixture decoder's render of the slots (twice the input channels)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if mixture_hint:
            unet = dataclasses.replace(unet, in_channels=2 * slots.in_channels, out_channels=slots.in_channels)
            mixture = SlotAutoencoder(slots)
            net = SlotUNet(mixture.encoder, UNet(unet), mixture)
        else:
            net = SlotUNet(SlotEncoder(slots), UNet(unet))
    return Denoiser(net, build_frame(DIFFUSION), DIFFUSION["prediction"])


class AutoencoderRun(NamedTuple):
    """A baseline training in progress: the model, its step count, optimizer and data generator."""
    model: SlotAutoencoder
    steps: int
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def train_autoencoder(images: torch.Tensor, cpu_seconds: float, *, config: SlotConfig = SLOTS, batch_size: int = 32,
                      lr: float = 1e-3, warmup: int = 100, seed: int = 0, max_steps: int | None = None, callback=None,
                      run: AutoencoderRun | None = None) -> AutoencoderRun:
    """The baseline: plain slot attention with the mixture decoder, trained by pixel MSE for
    ``cpu_seconds`` of process CPU time (or up to ``max_steps`` steps in all); ``callback(steps,
    model)`` is called after every step. ``run`` (an earlier call's result) goes on with that
    training as if it had not stopped. Returns an :class:`AutoencoderRun`."""
    if run is None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = SlotAutoencoder(config)
        run = AutoencoderRun(model, 0, torch.optim.Adam(model.parameters(), lr), torch.Generator().manual_seed(seed))
    model, steps, opt, generator = run
    model.train()
    start = time.process_time()
    while time.process_time() - start < cpu_seconds and (max_steps is None or steps < max_steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (steps + 1) / warmup)
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        noise = torch.randn(batch_size, config.num_slots, config.slot_dim, generator=generator)
        recon, _ = model(images[idx], noise)
        loss = F.mse_loss(recon, images[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        steps += 1
        if callback is not None:
            callback(steps, model)
    return AutoencoderRun(model.eval(), steps, opt, generator)


def object_slots(masks: torch.Tensor, true_masks: torch.Tensor) -> torch.Tensor:
    """(N, max_objects) long: for each true object, the slot holding most of its attention mass."""
    overlap = torch.einsum("nkhw,nohw->nok", masks, true_masks.float())
    return overlap.argmax(-1)


def swap_pairs(colours: torch.Tensor, counts: torch.Tensor, generator: torch.Generator):
    """For each scene a (other scene, its object, this scene's object) whose colour this scene
    lacks: (rows, others, other_objects, objects); scenes with no such partner are left out."""
    n = len(colours)
    present = colour_presence(colours)
    rows, others, other_objects, objects = [], [], [], []
    for i in range(n):
        for j in torch.randperm(n, generator=generator)[:20].tolist():
            new = [o for o in range(int(counts[j])) if not present[i, colours[j, o]]]
            if j != i and new:
                rows.append(i)
                others.append(j)
                other_objects.append(new[0])
                objects.append(int(torch.randint(int(counts[i]), (1,), generator=generator)))
                break
    return (torch.tensor(rows), torch.tensor(others), torch.tensor(other_objects), torch.tensor(objects))


def edit_pairs(train_set, model, fractions: tuple[float, float], *, seed: int = 0, size: int = SIZE,
               max_objects: int = MAX_OBJECTS):
    """The decoder's training data with slot-edit pairs: (targets, {"context": slots, "context_mask": kept}),
    the scenes decoded from their own slots (the encoder of ``model``, frozen, slots drawn with ``seed``),
    then for a ``fractions[0]`` share of the scenes one object's slot left out (:func:`object_slots`) with
    the scene re-rendered without that object as the target, and for a ``fractions[1]`` share one
    object's slot swapped for another scene's object of a colour the scene lacks (:func:`swap_pairs`),
    the scene re-rendered with that object in place of its own (exact targets,
    :func:`difflab.data.scenes.rerender_scenes`). ``train_set``: ``load_scenes(len, size=size,
    split="train", max_objects=max_objects)``, whose objects are re-rendered."""
    n = len(train_set.images)
    generator = torch.Generator().manual_seed(seed)
    vectors, masks = encode_slots(model, train_set.images, seed=seed)
    owners = object_slots(masks, train_set.masks)
    keep = torch.ones(n, vectors.shape[1], dtype=torch.bool)
    rows = torch.randperm(n, generator=generator)[: round(fractions[0] * n)]
    which = (torch.rand(len(rows), generator=generator) * train_set.counts[rows]).long()
    drop = torch.full((n,), -1)
    drop[rows] = which
    scenes = dict(size=size, split="train", max_objects=max_objects)
    targets, contexts, kept = [train_set.images], [vectors], [keep]
    if len(rows):
        targets.append(rerender_scenes(n, drop, **scenes)[rows])
        contexts.append(vectors[rows])
        kept.append(remove_slot(keep[rows], owners[rows, which]))
    swaps, others, other_objects, objects = swap_pairs(train_set.colours, train_set.counts, generator)
    take = torch.randperm(len(swaps), generator=generator)[: round(fractions[1] * n)]
    if len(take):
        swaps, others, other_objects, objects = swaps[take], others[take], other_objects[take], objects[take]
        drop, add = torch.full((n,), -1), torch.full((n, 2), -1)
        drop[swaps], add[swaps] = objects, torch.stack([others, other_objects], 1)
        targets.append(rerender_scenes(n, drop, add, **scenes)[swaps])
        contexts.append(swap_slots(vectors[swaps], owners[swaps, objects], vectors[others], owners[others, other_objects]))
        kept.append(keep[swaps])
    return torch.cat(targets), {"context": torch.cat(contexts), "context_mask": torch.cat(kept)}


def object_slot_sets(masks: torch.Tensor, true_masks: torch.Tensor, counts: torch.Tensor,
                     share: float | None = OBJECT_SHARE) -> torch.Tensor:
    """(N, max_objects, K) bool: the slots that hold each true object, its top slot
    (:func:`object_slots`) and every other slot holding at least ``share`` of the object's
    attention mass that is not another object's top slot (slot attention often splits an object:
    its top slot holds 85% of its attention on average, under 80% for a third of the objects;
    docs/slots.md, stop 39); a set that would hold every slot is the top slot alone (a removal
    must leave a slot to decode). ``share`` None: the top slot alone."""
    owners = object_slots(masks, true_masks)
    top = F.one_hot(owners, masks.shape[1]).bool()
    if share is None:
        return top
    real = (torch.arange(true_masks.shape[1])[None] < counts[:, None])[..., None]
    cover = torch.einsum("nkhw,nohw->nok", masks, true_masks.float()) / true_masks.sum((2, 3)).clamp_min(1)[..., None]
    real_tops = (top & real).long()
    others_top = (real_tops.sum(1, keepdim=True) - real_tops) > 0
    sets = top | ((cover >= share) & ~others_top)
    return torch.where(sets.all(-1, keepdim=True), top, sets)  # a set of every slot would leave none: the top slot


def mask_picture(masks: torch.Tensor) -> torch.Tensor:
    """Slot masks (N, K, H, W) as RGB in [-1, 1]: each slot a colour, weighted by its mask."""
    colours = torch.tensor([[1.0, 1.0, 1.0], [0.2, 0.2, 0.2], *PALETTE.tolist()])[: masks.shape[1]]
    return torch.einsum("nkhw,kc->nchw", masks, colours) * 2 - 1


def recompose(denoiser, judge, held, slot_vectors: torch.Tensor, masks: torch.Tensor, opts: dict, seed: int = 0,
              localised: bool = LOCALISED, share: float | None = OBJECT_SHARE, removal: str = REMOVAL,
              recon_scenes: int | None = RECON_SCENES):
    """Decode the held-out scenes from their slots (the first ``recon_scenes``; None: all), with one
    object's slots removed (scenes of 2+ objects), with one object's slots swapped for another
    scene's object of a new colour, and (12 scenes) with another scene's object slot added; the
    judge's figures and the pictures. An object's slots: :func:`object_slot_sets` (``share``).
    ``removal``: "whole" decodes the whole scene anew, "localised" regenerates only the removed
    slots' region (:func:`localised_edits`). ``localised``: the removal and the swap are also
    judged localised, as ``*_localised``."""
    if removal not in ("whole", "localised"):
        raise ValueError(f"removal={removal!r}: choose 'whole' or 'localised'")
    generator = torch.Generator().manual_seed(seed)
    n = len(slot_vectors)
    owners = object_slots(masks, held.masks)
    sets = object_slot_sets(masks, held.masks, held.counts, share)
    shown = slice(None) if recon_scenes is None else slice(0, recon_scenes)
    recon = decode_slots(denoiser, slot_vectors[shown], **opts)
    many = torch.nonzero(held.counts >= 2).flatten()
    which = torch.stack([torch.randint(int(held.counts[i]), (1,), generator=generator)[0] for i in many])
    gone = sets[many, which]
    rows, others, other_objects, objects = swap_pairs(held.colours, held.counts, generator)
    leaving, arriving = sets[rows, objects], sets[others, other_objects]
    swap = swap_slot_sets(slot_vectors[rows], leaving, slot_vectors[others], arriving)
    swapped = decode_slots(denoiser, swap[0], slot_mask=swap[1], **opts)
    few = torch.nonzero(held.counts < MAX_OBJECTS).flatten()[:12]
    donors = (few + 1) % n
    added = decode_slots(denoiser, add_slot(slot_vectors[few], slot_vectors[donors, owners[donors, 0]]), **opts)
    edits = (many, gone, rows, others, swap, leaving, arriving, held.colours[others, other_objects])
    local_figures, local = localised_edits(denoiser, judge, held, slot_vectors, masks, edits, opts,
                                           swap=localised) if localised or removal == "localised" else ({}, {})
    removed = local["removed_localised"] if removal == "localised" else decode_slots(denoiser, slot_vectors[many], slot_mask=~gone, **opts)
    present = judge.read(swapped)[1]
    figures = {
        "reconstruction_count_accuracy": float((judge.read(recon)[0] == held.counts[shown]).float().mean()),
        "reconstruction_n": len(recon),
        "remove_count_accuracy": float((judge.read(removed)[0] == held.counts[many] - 1).float().mean()),
        "remove_n": len(many), "removal": removal, "object_share": share,
        "removed_slots_per_scene": round(float(gone.sum(1).float().mean()), 3),
        "swap_found_accuracy": float(present[torch.arange(len(rows)), held.colours[others, other_objects]].float().mean()),
        "swap_n": len(rows),
        "add_count_accuracy": float((judge.read(added)[0] == held.counts[few] + 1).float().mean()),
        "add_n": len(few),
    }
    if localised:
        figures.update(local_figures)
    pictures = {"reconstructed": recon, "before_removal": held.images[many], "removed": removed,
                "before_swap": held.images[rows], "swapped_from": held.images[others], "swapped": swapped,
                "before_adding": held.images[few], "added": added}
    pictures.update({k: v for k, v in local.items() if localised})
    return figures, pictures


def localised_edits(denoiser, judge, held, slot_vectors, masks, edits, opts: dict,
                    resample: tuple[int, int] = LOCALISED_RESAMPLE, dilate: tuple[int, int] = LOCALISED_DILATE,
                    swap: bool = True):
    """The removal and (``swap``) the swap of :func:`recompose` regenerated only where they act
    (RePaint-style, :func:`difflab.pipelines.slots.decode_slots` with ``known``/``region``): the
    removed slots' masks, and the union of the leaving object's slots' masks with the arriving
    object's slots' masks in its own scene (the slots carry their position), grown by ``dilate``
    pixels; outside, the scene's own pixels; ``resample`` RePaint passes a step; both (removal,
    swap). ``edits``: (removal rows, removed slots (bool), swap rows, donor rows, the swapped slot
    set and its mask (:func:`swap_slot_sets`), the leaving and arriving slots (bool), the arriving
    object's colour)."""
    many, gone, rows, others, (swap_slots_, swap_mask), leaving, arriving, new_colours = edits
    region = edit_region(masks[many], gone, dilate=dilate[0])
    removed = decode_slots(denoiser, slot_vectors[many], slot_mask=~gone, known=held.images[many], region=region,
                           resample=resample[0], **opts)
    figures = {"remove_count_accuracy_localised": float((judge.read(removed)[0] == held.counts[many] - 1).float().mean())}
    pictures = {"removed_localised": removed}
    if swap:
        region = torch.maximum(edit_region(masks[rows], leaving, dilate=dilate[1]), edit_region(masks[others], arriving, dilate=dilate[1]))
        swapped = decode_slots(denoiser, swap_slots_, slot_mask=swap_mask, known=held.images[rows], region=region,
                               resample=resample[1], **opts)
        present = judge.read(swapped)[1]
        figures["swap_found_accuracy_localised"] = float(present[torch.arange(len(rows)), new_colours].float().mean())
        pictures["swapped_localised"] = swapped
    return figures, pictures


def save_pictures(out_dir: Path, images, masks, baseline, base_masks, pictures: dict, seed: int, k: int = 12) -> None:
    """``decomposition.png`` (scenes, slot masks, reconstructions, the baseline's masks and
    reconstructions) and ``composition.png`` (removal, swap and addition, before and after, the
    localised removal and swap under their whole-scene rows when there are) for
    the first ``k`` held-out scenes."""
    with torch.no_grad():
        base_recon = baseline.decode(encode_slots(baseline, images[:k], seed=seed)[0])[0].clamp(-1, 1)
    save_grid(torch.cat([images[:k], mask_picture(masks[:k]), pictures["reconstructed"][:k],
                         mask_picture(base_masks[:k]), base_recon]), out_dir / "decomposition.png", nrow=k, upscale=6)
    names = ("before_removal", "removed", "removed_localised", "before_swap", "swapped_from", "swapped",
             "swapped_localised", "before_adding", "added")
    save_grid(torch.cat([pictures[name][:k] for name in names if name in pictures]),
              out_dir / "composition.png", nrow=k, upscale=6)


def train_slot_diffusion(train_set, held, config: TrainConfig, out_dir: Path, report: dict, *, slots: SlotConfig,
                         unet: UNetConfig, seed: int, pretrain_steps: int, mixture_hint: bool,
                         edit_fractions: tuple[float, float], resume: bool):
    """The demo's step 3: the encoder is the baseline's after its first ``pretrain_steps`` steps (slot
    attention + mixture decoder), kept frozen while the U-Net learns to decode its slots by the
    diffusion loss (training both together from there undid the binding: FG-ARI 0.83 -> 0.48 in
    150 steps; docs/slots.md). Returns the trained denoiser (eval mode) and the baseline's run so far;
    fills ``report``'s pretraining and training figures."""
    t0 = time.process_time()
    base_run = train_autoencoder(train_set.images, float("inf"), config=slots, seed=seed, max_steps=pretrain_steps)
    report["pretrain_cpu_seconds"] = round(time.process_time() - t0, 1)
    report["fg_ari_pretrained"] = round(fg_ari(segment(encode_slots(base_run.model, held.images, seed=seed)[1]), held.segmentation()), 4)
    denoiser = slot_denoiser(slots, unet, config.seed, mixture_hint)
    frozen = denoiser.net.mixture if mixture_hint else denoiser.net.encoder
    frozen.load_state_dict((base_run.model if mixture_hint else base_run.model.encoder).state_dict())
    frozen.requires_grad_(False)
    print(f"[3/6] encoder: {pretrain_steps} steps with the mixture decoder ({report['pretrain_cpu_seconds']:.0f} CPU s, "
          f"held-out FG-ARI {report['fg_ari_pretrained']:.3f}); its slots decoded by diffusion, {config.steps} steps "
          f"(batch {config.batch_size})")
    t0 = time.process_time()
    data = (train_set.images, None, {"image": train_set.images})
    if any(edit_fractions):
        targets, cond = edit_pairs(train_set, base_run.model, edit_fractions, seed=seed)
        data = (targets, None, cond)
        report["edit_pairs"] = [len(targets) - len(train_set.images), *edit_fractions]
    train(denoiser, data, config, out_dir, resume=resume)
    report["diffusion_cpu_seconds"] = round(time.process_time() - t0, 1)
    report["train_cpu_seconds"] = round(report["pretrain_cpu_seconds"] + report["diffusion_cpu_seconds"], 1)
    denoiser.eval()
    return denoiser, base_run


def run_slots_demo(out_dir="demo_slots_out", *, steps: int | None = None, sampler: str = SAMPLER, sampling_steps: int = 25,
                   seed: int = 0, resume: bool = False, train_scenes: int = TRAIN_SCENES, held_scenes: int = HELD_SCENES,
                   judge_steps: int = JUDGE_STEPS, slots: SlotConfig = SLOTS, unet: UNetConfig = UNET,
                   pretrain_steps: int = PRETRAIN_STEPS, mixture_hint: bool = MIXTURE_HINT,
                   localised: bool = LOCALISED, edit_fractions: tuple[float, float] = EDIT_PAIRS,
                   object_share: float | None = OBJECT_SHARE, removal: str = REMOVAL,
                   recon_scenes: int | None = RECON_SCENES) -> dict:
    """Train, decompose, recompose and judge; writes the pictures and ``report.json``. ``localised``:
    the removal and swap are also judged regenerated only where they act (:func:`localised_edits`).
    ``edit_fractions``: the decoder also trains on slot-edit pairs (:func:`edit_pairs`; removal, swap).
    ``object_share``, ``removal``, ``recon_scenes``: see :func:`recompose`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cpu_start, wall_start = time.process_time(), time.time()
    config = TRAIN if steps is None else dataclasses.replace(TRAIN, steps=steps)
    opts = dict(sampler=sampler, steps=sampling_steps, seed=seed, progress=False, size=SIZE)
    report = {}

    # 1. Data.
    train_set = load_scenes(train_scenes, size=SIZE, split="train", max_objects=MAX_OBJECTS)
    held = load_scenes(held_scenes, size=SIZE, split="test", max_objects=MAX_OBJECTS)
    true_seg = held.segmentation()
    print(f"[1/6] data: {len(train_set.images)} training scenes, {len(held.images)} held out ({SIZE}x{SIZE}, "
          f"1-{MAX_OBJECTS} objects), {slots.num_slots} slots")

    # 2. The judge: counts and colours, trained on the training scenes only.
    judge = judge_step(train_set, held, judge_steps, seed, report)

    # 3. Slot diffusion on the encoder of the baseline's first steps (:func:`train_slot_diffusion`).
    denoiser, base_run = train_slot_diffusion(train_set, held, config, out_dir, report, slots=slots, unet=unet, seed=seed,
                                              pretrain_steps=pretrain_steps, mixture_hint=mixture_hint,
                                              edit_fractions=edit_fractions, resume=resume)

    # 4. The baseline goes on for the diffusion's CPU time: the same CPU time in all.
    base_run = train_autoencoder(train_set.images, report["diffusion_cpu_seconds"], config=slots, seed=seed, run=base_run)
    baseline = base_run.model
    report["baseline_steps"] = base_run.steps
    print(f"[4/6] baseline slot attention + mixture decoder: {base_run.steps} steps in the same "
          f"{report['train_cpu_seconds']:.0f} CPU s")

    # 5. Object discovery on held-out scenes: FG-ARI of the argmax slot masks.
    slot_vectors, masks = encode_slots(denoiser, held.images, seed=seed)
    with torch.no_grad():
        base_masks = baseline.decode(encode_slots(baseline, held.images, seed=seed)[0])[1]
    report["fg_ari"] = round(fg_ari(segment(masks), true_seg), 4)
    report["fg_ari_baseline"] = round(fg_ari(segment(base_masks), true_seg), 4)
    report["fg_ari_baseline_attention"] = round(fg_ari(segment(encode_slots(baseline, held.images, seed=seed)[1]), true_seg), 4)
    print(f"[5/6] FG-ARI on {len(held.images)} held-out scenes: slot diffusion {report['fg_ari']:.3f}, "
          f"slot attention + mixture decoder {report['fg_ari_baseline']:.3f} (alpha masks), "
          f"{report['fg_ari_baseline_attention']:.3f} (attention masks)")

    # 6. Reconstruction and composition, judged.
    t0 = time.process_time()
    figures, pictures = recompose(denoiser, judge, held, slot_vectors, masks, opts, seed, localised, object_share, removal,
                                  recon_scenes)
    report.update(figures)
    print(f"[6/6] decoding ({time.process_time() - t0:.0f} CPU s): count kept in reconstructions "
          f"{report['reconstruction_count_accuracy']:.1%}; one fewer after removing a slot {report['remove_count_accuracy']:.1%} "
          f"({report['remove_n']} scenes); swapped object found {report['swap_found_accuracy']:.1%} ({report['swap_n']} scenes)"
          + (f"; localised (the scene's own pixels outside the edit): one fewer {report['remove_count_accuracy_localised']:.1%}, "
             f"swapped object found {report['swap_found_accuracy_localised']:.1%}" if localised else ""))
    save_pictures(out_dir, held.images, masks, baseline, base_masks, pictures, seed)
    report.update(steps=config.steps, sampler=sampler, sampling_steps=sampling_steps, held_out=len(held.images),
                  num_slots=slots.num_slots, colours=list(COLOURS),
                  cpu_seconds=round(time.process_time() - cpu_start, 1), wall_seconds=round(time.time() - wall_start, 1),
                  threads=torch.get_num_threads())
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    print(format_report(report))
    return report


def format_report(r: dict) -> str:
    rows = [
        ("FG-ARI, slot diffusion (held out)", f"{r['fg_ari']:.3f}", f"{r['held_out']} scenes"),
        ("FG-ARI, its encoder at the hand-over", f"{r['fg_ari_pretrained']:.3f}", f"{r['pretrain_cpu_seconds']:.0f} CPU s"),
        ("FG-ARI, slot attention + mixture decoder", f"{r['fg_ari_baseline']:.3f}", f"alpha masks; same CPU time, {r['baseline_steps']} steps"),
        ("  the same, its attention masks", f"{r['fg_ari_baseline_attention']:.3f}", ""),
        ("judge: count kept in reconstructions", f"{r['reconstruction_count_accuracy']:.1%}", ""),
        ("judge: one object fewer after removing a slot", f"{r['remove_count_accuracy']:.1%}",
         f"{r['remove_n']} scenes; {r['removal']}" + ("" if r["object_share"] is None else
                                                       f"; the object's slots (share >= {r['object_share']})")),
        ("judge: swapped-in object found", f"{r['swap_found_accuracy']:.1%}", f"{r['swap_n']} scenes"),
        *([("judge: one fewer, localised removal", f"{r['remove_count_accuracy_localised']:.1%}",
            "regenerated inside the slot's mask only; the scene's own pixels outside"),
           ("judge: swapped-in object found, localised swap", f"{r['swap_found_accuracy_localised']:.1%}",
            "inside both objects' masks only")] if "remove_count_accuracy_localised" in r else []),
        ("judge: count, real held-out scenes", f"{r['judge_real_count_accuracy']:.1%}", ""),
        ("CPU time: train / total", f"{r['train_cpu_seconds']:.0f}s / {r['cpu_seconds']:.0f}s", f"{r['threads']} thread(s)"),
    ]
    w = max(len(a) for a, _, _ in rows)
    return "\n".join(f"  {a:<{w}}  {v:>10}  {c}" for a, v, c in rows)


__all__ = ["run_slots_demo", "slot_denoiser", "train_autoencoder", "AutoencoderRun", "object_slots", "swap_pairs", "recompose", "localised_edits", "edit_pairs", "object_slot_sets", "format_report"]
