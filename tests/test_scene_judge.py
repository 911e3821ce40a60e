"""The scenes judge (difflab.eval.scene_judge): shifts, the empty room, the schedule, seeding."""
import pytest
import torch

from difflab.data.scenes import load_scenes
from difflab.eval.scene_judge import SceneJudge, empty_room, judge_accuracy, shifted, train_scene_judge


def test_shifted_moves_by_at_most_shift_pixels():
    x = torch.randn(8, 3, 16, 16)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(shifted(x, 0, g), x)
    y = shifted(x, 1, g)
    assert y.shape == x.shape
    for i in range(len(x)):  # each output is the input moved by (dy, dx) in {-1, 0, 1}^2 in its interior
        assert any(torch.equal(y[i, :, 2:-2, 2:-2], x[i, :, 2 + dy:14 + dy, 2 + dx:14 + dx])
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1))


def test_empty_room_is_an_image_in_range():
    room = empty_room(16)
    assert room.shape == (3, 16, 16) and room.min() >= -1 and room.max() <= 1
    assert torch.equal(room, room.flip(2))  # the room has no object: mirrored, it is the same


def test_judge_is_seeded_and_learns_the_empty_room():
    scenes = load_scenes(96, size=16, max_objects=3)
    kw = dict(max_objects=3, steps=30, batch_size=16, norm=True, empty=0.4)
    a = train_scene_judge(scenes.images, scenes.counts, scenes.colours, **kw)
    b = train_scene_judge(scenes.images, scenes.counts, scenes.colours, **kw)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    counts, colours = a.read(empty_room(16)[None].repeat(4, 1, 1, 1))
    assert counts.tolist() == [0] * 4 and not colours.any()  # one fixed image, 40% of every batch
    read, _ = a.read(scenes.images)
    assert read.min() >= 0 and read.max() <= 3


def test_judge_without_the_empty_room_reads_one_to_max():
    scenes = load_scenes(96, size=16, max_objects=3)
    judge = train_scene_judge(scenes.images, scenes.counts, scenes.colours, max_objects=3, steps=2, batch_size=8)
    read, _ = judge.read(scenes.images)
    assert read.min() >= 1 and read.max() <= 3 and not judge.empty
    assert set(judge_accuracy(judge, scenes.images, scenes.counts, scenes.colours)) == {"count", "colours"}
    assert SceneJudge(3, empty=True).count_head.out_features == 4


def test_bad_schedule_is_refused():
    scenes = load_scenes(96, size=16, max_objects=3)
    with pytest.raises(ValueError, match="lr_schedule"):
        train_scene_judge(scenes.images, scenes.counts, scenes.colours, max_objects=3, steps=1, lr_schedule="step")
