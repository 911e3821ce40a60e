"""Short runs of `difflab demo --depth` and `--slots` (tiny data, a few steps): every stage runs,
the pictures and the report are written, the figures are in range."""
import json

import pytest
import torch

from difflab.demos.depth import REGRESSOR_FRACTION, run_depth_demo
from difflab.data.scenes import load_scenes
from difflab.demos.depth import MAX_OBJECTS
from difflab.demos.slots import SLOTS, edit_pairs, mask_picture, object_slot_sets, run_slots_demo
from difflab.nn.slot_attention import SlotAutoencoder


def test_depth_demo_runs_end_to_end(tmp_path):
    report = run_depth_demo(tmp_path, steps=3, sampling_steps=2, samples_per_class=2, resample=1, train_scenes=64,
                            held_scenes=6, judge_steps=3, generation_steps=3)
    assert (report["generation_sampler"], report["generation_steps"], report["sampler"]) == ("euler_ancestral", 3, "ddim")
    for name in ("pairs.png", "depth_from_image.png", "image_from_depth.png", "report.json"):
        assert (tmp_path / name).exists()
    assert json.loads((tmp_path / "report.json").read_text())["samples"] == 6
    for key in ("consistency_generated", "diffusion_depth_from_real", "regressor_depth_from_real"):
        assert 0 <= report[key]["delta_1.25"] <= 1 and report[key]["abs_rel"] >= 0
    assert report["regressor_steps"] >= 1
    assert report["regressor_cpu_seconds"] == pytest.approx(REGRESSOR_FRACTION * report["train_cpu_seconds"], abs=0.1)
    by_count = report["judge_generated_count_accuracy_by_count"]
    assert list(by_count) == ["1", "2", "3"] and all(v in (0, 0.5, 1) for v in by_count.values())
    assert abs(sum(by_count.values()) / 3 - report["judge_generated_count_accuracy"]) < 1e-6
    strict = report["generated_count_and_object_accuracy_by_count"]
    assert all(strict[k] <= by_count[k] for k in by_count) and sum(report["generated_empty_by_count"].values()) <= 6
    assert report["condition"] == "object_set"
    as_asked = report["judge_generated_object_set_accuracy_by_count"]
    assert all(as_asked[k] <= by_count[k] for k in by_count) and 0 <= report["judge_generated_object_set_accuracy"] <= 1
    assert all(sum(v) == 2 for v in report["judge_read_as_count"].values())


def test_asked_scenes_ask_each_count_and_under_object_set_distinct_colour_sets():
    from difflab.demos.depth import asked_scenes

    labels, counts, colours = asked_scenes(4, "count")
    assert labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4 and counts.tolist() == [1] * 4 + [2] * 4 + [3] * 4
    assert colours is None
    labels, counts, colours = asked_scenes(4, "object_set")
    assert counts.tolist() == [1] * 4 + [2] * 4 + [3] * 4 and torch.equal(colours.sum(1), counts)
    assert len({tuple(c.tolist()) for c in colours}) == 12 and len(set(labels.tolist())) == 12


def test_has_object_tells_an_empty_room_from_a_scene_with_an_object():
    from difflab.data.scenes import depth_to_unit
    from difflab.demos.depth import SIZE, has_object, scene_data

    train_set, held = scene_data(64, 8)
    background = depth_to_unit(train_set.depth, SIZE).amax(dim=(0, 3), keepdim=True)
    assert bool(has_object(depth_to_unit(held.depth, SIZE), background).all())       # real scenes: 1-3 objects
    room = background.expand(2, 1, SIZE, SIZE).clone()
    assert not bool(has_object(room, background).any())                               # the empty room itself
    room[1, 0, 10:13, 5:8] -= 0.3                                                       # a box in front of the wall
    assert has_object(room, background).tolist() == [False, True]


def test_slots_demo_runs_end_to_end(tmp_path):
    report = run_slots_demo(tmp_path, steps=2, sampling_steps=2, train_scenes=64, held_scenes=12, judge_steps=3,
                            pretrain_steps=3, localised=True, edit_fractions=(0.5, 0.25), object_share=0.1,
                            removal="localised", recon_scenes=5)
    for name in ("decomposition.png", "composition.png", "report.json"):
        assert (tmp_path / name).exists()
    assert -1 <= report["fg_ari"] <= 1 and -1 <= report["fg_ari_baseline"] <= 1
    assert report["baseline_steps"] > 3  # the baseline went on past the encoder's hand-over at 3 steps
    assert report["train_cpu_seconds"] == round(report["pretrain_cpu_seconds"] + report["diffusion_cpu_seconds"], 1)
    assert report["remove_n"] >= 1 and report["swap_n"] >= 1
    assert 0 <= report["swap_found_accuracy"] <= 1
    assert 0 <= report["remove_count_accuracy_localised"] <= 1 and 0 <= report["swap_found_accuracy_localised"] <= 1
    assert report["edit_pairs"] == [32 + 16, 0.5, 0.25]  # 64 scenes: 32 removal pairs and 16 swap pairs
    assert report["reconstruction_n"] == 5 and report["removal"] == "localised" and report["removed_slots_per_scene"] >= 1


def test_demo_slots_outnumber_objects_and_room_and_each_gets_a_picture_colour():
    # stop 40: K = MAX_OBJECTS + 4, so two objects need not share a slot (the room takes one or two)
    assert SLOTS.num_slots >= MAX_OBJECTS + 3
    masks = torch.softmax(torch.randn(2, SLOTS.num_slots, 16, 16), 1)
    picture = mask_picture(masks)
    assert picture.shape == (2, 3, 16, 16) and picture.min() >= -1 and picture.max() <= 1
    one_hot = torch.eye(SLOTS.num_slots)[:, :, None, None].expand(-1, -1, 16, 16)  # slot k alone everywhere
    colours = mask_picture(one_hot)[:, :, 0, 0]
    assert len({tuple(c.tolist()) for c in colours}) == SLOTS.num_slots  # every slot its own colour


def test_object_slot_sets_take_the_top_slot_and_the_slots_sharing_the_object():
    masks = torch.zeros(1, 4, 2, 2)
    masks[0, :, 0, 0] = torch.tensor([0.7, 0.2, 0.05, 0.05])  # object 0 (pixel (0, 0)): slot 0 on top, slot 1 holds 0.2
    masks[0, :, 0, 1] = torch.tensor([0.1, 0.1, 0.8, 0.0])  # object 1 (pixel (0, 1)): slot 2
    masks[0, :, 1, :] = torch.tensor([0.0, 0.0, 0.0, 1.0])[:, None]  # the room: slot 3
    true = torch.zeros(1, 3, 2, 2, dtype=torch.bool)
    true[0, 0, 0, 0] = true[0, 1, 0, 1] = True
    counts = torch.tensor([2])
    assert object_slot_sets(masks, true, counts, None)[0, :2].nonzero().tolist() == [[0, 0], [1, 2]]
    sets = object_slot_sets(masks, true, counts, 0.1)[0, :2]
    assert sets.tolist() == [[True, True, False, False], [False, True, True, False]]  # slot 0, object 0's top, never object 1's
    sets = object_slot_sets(masks, true, counts, 0.15)[0, :2]
    assert sets.tolist() == [[True, True, False, False], [False, False, True, False]]
    assert object_slot_sets(masks, true, counts, 0.0)[0, 0].tolist() == [True, True, False, True]
    one = torch.tensor([1])  # object 0 alone: at share 0 every slot holds some of it, and a set of all is its top slot
    assert object_slot_sets(masks, true, one, 0.0)[0, 0].tolist() == [True, False, False, False]


def test_edit_pairs_leave_one_slot_out_or_swap_one_in_with_rerendered_targets():
    train_set = load_scenes(40, size=16, split="train", max_objects=3)
    model = SlotAutoencoder(SLOTS).eval()
    targets, cond = edit_pairs(train_set, model, (0.5, 0.25), seed=0)
    assert targets.shape == (70, 3, 16, 16) and cond["context"].shape == (70, SLOTS.num_slots, 64)
    assert torch.equal(targets[:40], train_set.images) and cond["context_mask"][:40].all()
    assert (cond["context_mask"][40:60].sum(1) == SLOTS.num_slots - 1).all()  # one slot left out of each removal pair
    assert cond["context_mask"][60:].all() and not torch.equal(cond["context"][60:], cond["context"][:10])
    originals = train_set.images.flatten(1)
    for row in range(40, 60):  # every removal's target is a changed scene: no target equals an original
        # (a swap's may: a one-object scene given the object of another one-object scene *is* that scene)
        assert not (targets[row].flatten() == originals).all(1).any()


def test_demo_modes_take_their_own_sampler_default(monkeypatch, tmp_path):
    import dataclasses

    from difflab.cli import demo as cli_demo
    from difflab.cli import main
    seen = {}
    for name in ("slots", "depth"):
        monkeypatch.setitem(cli_demo.MODES, name, dataclasses.replace(
            cli_demo.MODES[name], run=lambda args, out, name=name: seen.setdefault(name, []).append(args.sampler)))
    assert main(["demo", "--slots", "--out-dir", str(tmp_path)]) == 0
    assert main(["demo", "--slots", "--sampler", "ddim", "--out-dir", str(tmp_path)]) == 0
    assert main(["demo", "--depth", "--out-dir", str(tmp_path)]) == 0
    assert seen == {"slots": ["euler_ancestral", "ddim"], "depth": ["ddim"]}
