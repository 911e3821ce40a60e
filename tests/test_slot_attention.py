"""Slot attention's symmetry, the slot-diffusion network and pipeline, FG-ARI."""
import dataclasses

import pytest
import torch

from difflab.core import Denoiser
from difflab.eval.scene_metrics import abs_rel, delta_accuracy, fg_ari
from difflab.io.spec import build_frame
from difflab.nn.slot_attention import SlotAttention, SlotAutoencoder, SlotConfig, SlotEncoder, SlotUNet
from difflab.nn.unet import UNet, UNetConfig
from difflab.pipelines.slots import (add_slot, decode_slots, edit_region, encode_slots, remove_slot, segment, swap_slot_sets,
                                     swap_slots)
from difflab.train import TrainConfig, train

TINY = SlotConfig(in_channels=3, size=8, num_slots=4, slot_dim=16, iters=3, hidden=16, mlp_hidden=32)


def test_slot_attention_is_equivariant_to_the_order_of_its_initialization():
    torch.manual_seed(0)
    module = SlotAttention(in_dim=12, slot_dim=16, iters=3).double()
    inputs = torch.randn(2, 30, 12, dtype=torch.float64)
    init = torch.randn(2, 5, 16, dtype=torch.float64)
    perm = torch.tensor([3, 0, 4, 1, 2])
    slots, attn = module(inputs, init)
    slots_p, attn_p = module(inputs, init[:, perm])
    assert torch.allclose(slots_p, slots[:, perm], atol=1e-10)  # the same slots, permuted
    assert torch.allclose(attn_p, attn[:, :, perm], atol=1e-10)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 30, dtype=torch.float64))  # softmax over the slots
    assert not torch.allclose(slots[:, 0], slots[:, 1])  # and the slots do differ


def test_encoder_masks_partition_the_pixels_and_fixed_noise_fixes_the_slots():
    encoder = SlotEncoder(TINY)
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    noise = torch.randn(3, 4, 16)
    slots, masks = encoder(images, noise)
    assert slots.shape == (3, 4, 16) and masks.shape == (3, 4, 8, 8)
    assert torch.allclose(masks.sum(1), torch.ones(3, 8, 8), atol=1e-5)
    assert torch.equal(encoder(images, noise)[0], slots)
    a, _ = encode_slots(encoder_holder(encoder), images, seed=1, batch_size=1)
    b, _ = encode_slots(encoder_holder(encoder), images, seed=1, batch_size=3)
    assert torch.allclose(a, b, atol=1e-6)  # per-image noise: the batch size does not matter
    recon, mix = SlotAutoencoder(TINY)(images, noise)
    assert recon.shape == images.shape and torch.allclose(mix.sum(1), torch.ones(3, 8, 8), atol=1e-5)


def test_encoder_options_keep_the_default_layout_and_straight_through_changes_only_gradients():
    assert SlotConfig.from_dict({k: v for k, v in TINY.to_dict().items() if k not in (
        "kernel_size", "decoder_kernel_size", "learned_init", "straight_through")}) == TINY  # old configs load
    old = SlotAutoencoder(TINY).state_dict()
    torch.manual_seed(0)
    plain = SlotEncoder(dataclasses.replace(TINY, kernel_size=1, learned_init=True))
    assert plain.cnn[0].weight.shape[-1] == 1 and plain.mu.shape == (1, 4, 16)
    assert SlotAutoencoder(dataclasses.replace(TINY, decoder_kernel_size=1)).decoder[0].weight.shape[-1] == 1
    assert {k: v.shape for k, v in SlotAutoencoder(TINY).state_dict().items()} == {k: v.shape for k, v in old.items()}
    st = SlotEncoder(dataclasses.replace(TINY, kernel_size=1, learned_init=True, straight_through=True))
    st.load_state_dict(plain.state_dict())
    images, noise = torch.rand(2, 3, 8, 8) * 2 - 1, torch.randn(2, 4, 16)
    a, b = plain(images, noise)[0], st(images, noise)[0]
    assert torch.allclose(a, b, atol=1e-6)  # the same forward pass
    ga = torch.autograd.grad(a.square().sum(), plain.slot_attention.gru.weight_ih)[0]
    gb = torch.autograd.grad(b.square().sum(), st.slot_attention.gru.weight_ih)[0]
    assert not torch.allclose(ga, gb)  # only the last iteration's gradient
    assert torch.autograd.grad(st(images, noise)[0].sum(), st.mu)[0].abs().sum() > 0  # reaches the learned init
    with pytest.raises(ValueError, match="kernel_size must be an odd"):
        SlotConfig(kernel_size=4)


def encoder_holder(encoder):
    holder = torch.nn.Module()
    holder.encoder = encoder
    return holder


def _slot_denoiser():
    torch.manual_seed(0)
    unet = UNet(UNetConfig(in_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                           num_heads=2, groups=4, context_dim=16))
    frame = build_frame({"frame": "vp_discrete", "schedule": "cosine", "T": 1000})
    return Denoiser(SlotUNet(SlotEncoder(TINY), unet), frame, "v")


def test_slot_diffusion_trains_the_encoder_through_the_decoder_and_edits_decode(tmp_path):
    denoiser = _slot_denoiser()
    images = torch.rand(16, 3, 8, 8) * 2 - 1
    before = [p.detach().clone() for p in denoiser.net.encoder.parameters()]
    config = TrainConfig(steps=3, batch_size=4, lr=1e-3, ema_decay=None, checkpoint_every=0, log_every=1, progress=False)
    train(denoiser, (images, None, {"image": images}), config, tmp_path / "run")
    changed = [not torch.equal(a, b) for a, b in zip(before, denoiser.net.encoder.parameters())]
    assert all(changed)  # every encoder parameter gets a gradient from the diffusion loss
    denoiser.eval()
    with torch.no_grad():
        denoiser.net.unet.out[-1].weight.normal_(0, 0.1)  # a decoder whose output depends on the slots
        for block in denoiser.net.unet.modules():
            if hasattr(block, "kv") and hasattr(block, "proj"):
                block.proj.weight.normal_(0, 0.5)
    slots, masks = encode_slots(denoiser, images[:2])
    full = decode_slots(denoiser, slots, size=8, steps=3, progress=False)
    keep = remove_slot(torch.ones(2, 4, dtype=torch.bool), torch.tensor([0, 2]))
    assert keep.sum().item() == 6 and not keep[0, 0] and not keep[1, 2]
    fewer = decode_slots(denoiser, slots, slot_mask=keep, size=8, steps=3, progress=False)
    assert full.shape == (2, 3, 8, 8) and not torch.allclose(full, fewer)
    one_by_one = decode_slots(denoiser, slots, slot_mask=keep, size=8, steps=3, progress=False, batch_size=1)
    assert torch.allclose(fewer, one_by_one, atol=1e-5)
    swapped = swap_slots(slots, torch.tensor([1, 1]), slots.flip(0), torch.tensor([3, 0]))
    assert torch.equal(swapped[0, 1], slots[1, 3]) and torch.equal(swapped[1, 1], slots[0, 0])
    assert torch.equal(swapped[:, 0], slots[:, 0])
    assert add_slot(slots, slots[:, 0]).shape == (2, 5, 16)
    assert segment(masks).shape == (2, 8, 8)


def test_localised_decoding_keeps_the_scene_outside_the_edit_region():
    torch.manual_seed(0)
    denoiser = _slot_denoiser().eval()
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    slots, masks = encode_slots(denoiser, images)
    masks = torch.zeros_like(masks)
    masks[0, 1, 2:4, 2:4] = 1.0  # slot 1 of scene 0 holds a 2x2 square; slot 3 of scene 1 one pixel
    masks[1, 3, 6, 6] = 0.9
    region = edit_region(masks, torch.tensor([1, 3]))
    assert region[0, 0].sum() == 16 and region[0, 0, 1:5, 1:5].all()  # the square grown by a pixel
    assert region[1, 0].sum() == 9 and region[1, 0, 5:8, 5:8].all()
    assert edit_region(masks, torch.tensor([1, 3]), dilate=0).sum() == 5
    both = torch.zeros(2, 4, dtype=torch.bool)
    both[0, 1] = both[1, 3] = True
    assert torch.equal(edit_region(masks, both), region)  # a one-slot set is that slot's region
    both[0, 3] = True  # slot 3 of scene 0 holds nothing above the threshold: the union is unchanged
    assert torch.equal(edit_region(masks, both, dilate=0), edit_region(masks, torch.tensor([1, 3]), dilate=0))
    masks[0, 2, 6, 0] = 0.5
    both[0, 2] = True
    assert edit_region(masks, both, dilate=0)[0].sum() == 5  # the square and slot 2's pixel
    keep = remove_slot(torch.ones(2, 4, dtype=torch.bool), torch.tensor([1, 3]))
    out = decode_slots(denoiser, slots, slot_mask=keep, known=images, region=region, size=8, steps=3, progress=False)
    outside = ~region.bool().expand_as(images)
    assert torch.equal(out[outside], images[outside])  # exactly the scene's own pixels outside
    whole = decode_slots(denoiser, slots, slot_mask=keep, size=8, steps=3, progress=False)
    assert not torch.allclose(out[~outside], images[~outside]) and not torch.allclose(whole[outside], images[outside])
    with pytest.raises(ValueError, match="both known"):
        decode_slots(denoiser, slots, known=images, size=8)
    with pytest.raises(ValueError, match="only 0"):
        decode_slots(denoiser, slots, known=images, region=region * 0.5, size=8)


def test_swap_slot_sets_takes_the_kept_slots_and_the_arriving_ones():
    slots, other = torch.randn(3, 4, 16), torch.randn(3, 4, 16)
    leaving = torch.zeros(3, 4, dtype=torch.bool)
    arriving = torch.zeros(3, 4, dtype=torch.bool)
    leaving[0, 1] = arriving[0, 2] = True  # one slot each way: swap_slots up to order
    leaving[1, [0, 3]] = arriving[1, 1] = True  # two leave, one arrives
    leaving[2, 2] = arriving[2, [0, 3]] = True  # one leaves, two arrive: 5 slots, the longest row
    out, mask = swap_slot_sets(slots, leaving, other, arriving)
    assert out.shape == (3, 5, 16) and mask.sum(1).tolist() == [4, 3, 5]
    one = swap_slots(slots[:1], torch.tensor([1]), other[:1], torch.tensor([2]))[0]
    assert torch.equal(torch.sort(out[0, mask[0]], 0).values, torch.sort(one, 0).values)
    assert torch.equal(out[1, mask[1]], torch.stack([slots[1, 1], slots[1, 2], other[1, 1]]))
    assert torch.equal(out[2, mask[2]], torch.stack([slots[2, 0], slots[2, 1], slots[2, 3], other[2, 0], other[2, 3]]))


def test_fg_ari_and_depth_errors():
    true = torch.tensor([[[0, 1, 1], [2, 2, 0], [1, 2, 0]]])
    relabelled = torch.tensor([[[4, 0, 0], [3, 3, 1], [0, 3, 2]]])  # background ignored, objects renamed
    assert fg_ari(relabelled, true) == pytest.approx(1.0)
    assert fg_ari(torch.zeros_like(true), true) == pytest.approx(0.0)  # everything in one segment
    d = torch.tensor([1.0, 2.0, 4.0])
    assert abs_rel(d * 1.1, d) == pytest.approx(0.1)
    assert delta_accuracy(torch.tensor([1.0, 2.6, 4.0]), d) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same shape"):
        fg_ari(true[:, :2], true)


def test_slot_unet_needs_an_image_or_slots():
    with pytest.raises(ValueError, match="image="):
        _slot_denoiser().net(torch.zeros(1, 3, 8, 8), torch.zeros(1))
    with pytest.raises(ValueError, match="slot_mask"):
        decode_slots(_slot_denoiser(), torch.zeros(1, 4, 16), slot_mask=torch.ones(1, 3, dtype=torch.bool), size=8)


def test_absorbed_masks_give_a_removed_slots_alpha_to_the_absorbing_slots_only():
    torch.manual_seed(0)
    mixture = SlotAutoencoder(TINY)
    slots = torch.randn(3, 4, 16)
    keep = remove_slot(torch.ones(3, 4, dtype=torch.bool), torch.tensor([1, 3, 0]))
    absorb = torch.tensor([[True, False, False, False], [False, False, True, True], [True, False, False, False]])
    full = mixture.decode(slots)[1]
    recon, masks = mixture.decode(slots, keep, absorb)
    assert torch.allclose(masks.sum(1), torch.ones(3, 8, 8), atol=1e-6)
    assert torch.all(masks[0, 1] == 0) and torch.all(masks[1, 3] == 0)
    assert torch.allclose(masks[0, [2, 3]], full[0, [2, 3]])  # the other kept slots keep their alpha
    assert torch.allclose(masks[0, 0], full[0, 0] + full[0, 1])  # the one absorbing slot takes it all
    # row 1: slot 2 absorbs (slot 3, also marked, is the removed one); row 2: its absorber is removed -> plain
    assert torch.allclose(masks[1, 2], full[1, 2] + full[1, 3], atol=1e-6)
    assert torch.allclose(masks[2], mixture.decode(slots[2:], keep[2:])[1][0], atol=1e-6)
    assert not torch.allclose(recon[:2], mixture.decode(slots[:2], keep[:2])[0])
    net = SlotUNet(mixture.encoder, UNet(UNetConfig(in_channels=6, out_channels=3, model_channels=8, channel_mult=(1,), attention_levels=(0,),
                                                    num_res_blocks=1, num_heads=2, groups=4, context_dim=16)), mixture)
    with torch.no_grad():
        net.unet.input_conv.weight[:, 3:].normal_(0, 1.0)
        net.unet.out[-1].weight.normal_(0, 0.1)
        x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 0.5)
        assert not torch.allclose(net(x, t, context=slots, context_mask=keep),
                                  net(x, t, context=slots, context_mask=keep, hint_absorb=absorb))
    with pytest.raises(ValueError, match="absorb"):
        decode_slots(_slot_denoiser(), slots, absorb=absorb, size=8)  # no slot_mask
    with pytest.raises(ValueError, match="mixture"):
        decode_slots(_slot_denoiser(), slots, slot_mask=keep, absorb=absorb, size=8)  # no mixture hint


def test_mixture_hint_renders_only_the_kept_slots_and_feeds_the_unet():
    torch.manual_seed(0)
    mixture = SlotAutoencoder(TINY)
    slots = torch.randn(2, 4, 16)
    keep = remove_slot(torch.ones(2, 4, dtype=torch.bool), torch.tensor([1, 3]))
    recon, masks = mixture.decode(slots, keep)
    assert torch.all(masks[0, 1] == 0) and torch.all(masks[1, 3] == 0)
    for i, gone in enumerate((1, 3)):  # the same as decoding the kept slots alone
        kept = [k for k in range(4) if k != gone]
        alone, alone_masks = mixture.decode(slots[i:i + 1, kept])
        assert torch.allclose(recon[i:i + 1], alone, atol=1e-6) and torch.allclose(masks[i:i + 1, kept], alone_masks, atol=1e-6)
    config = UNetConfig(in_channels=6, out_channels=3, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), num_heads=2, groups=4, context_dim=16)
    net = SlotUNet(mixture.encoder, UNet(config), mixture)
    with torch.no_grad():
        net.unet.input_conv.weight[:, 3:].normal_(0, 1.0)  # make the output depend on the hint
        net.unet.out[-1].weight.normal_(0, 0.1)
        x, t = torch.randn(2, 3, 8, 8), torch.full((2,), 0.5)
        full = net(x, t, context=slots)
        fewer = net(x, t, context=slots, context_mask=keep)
    assert full.shape == (2, 3, 8, 8) and not torch.allclose(full, fewer)
    with pytest.raises(ValueError, match="in_channels=6, out_channels=3"):
        SlotUNet(mixture.encoder, UNet(dataclasses.replace(config, in_channels=3, out_channels=None)), mixture)
    with pytest.raises(ValueError, match="whose .encoder"):
        SlotUNet(SlotEncoder(TINY), UNet(config), mixture)
