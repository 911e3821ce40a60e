"""Labels of the scenes: count and object-set conditions, deterministic, decoding back to the scene's objects."""
import pytest
import torch

from difflab.data.scene_labels import labels_asking, num_labels, object_set_of, object_sets, scene_labels
from difflab.data.scenes import load_scenes


def test_object_sets_are_every_distinct_colour_set_once_in_count_order():
    sets = object_sets(3)
    assert num_labels("object_set", 3) == len(sets) == 6 + 15 + 20 and num_labels("count", 3) == 3
    assert len(set(sets)) == len(sets) and all(list(s) == sorted(set(s)) for s in sets)
    assert [len(s) for s in sets] == sorted(len(s) for s in sets)
    assert sets[:6] == tuple((c,) for c in range(6)) and sets[6] == (0, 1) and sets[-1] == (3, 4, 5)


@pytest.mark.parametrize("condition", ["count", "object_set"])
def test_scene_labels_round_trip_to_the_scene_objects(condition):
    scenes = load_scenes(60, size=16, split="test", max_objects=3)
    labels = scene_labels(scenes.counts, scenes.colours, condition, 3)
    assert torch.equal(labels, scene_labels(scenes.counts, scenes.colours, condition, 3))  # deterministic
    assert 0 <= int(labels.min()) and int(labels.max()) < num_labels(condition, 3)
    for label, count, colours in zip(labels.tolist(), scenes.counts.tolist(), scenes.colours.tolist()):
        got_count, got_colours = object_set_of(label, condition, 3)
        assert got_count == count
        assert got_colours == (None if condition == "count" else tuple(sorted(c for c in colours if c >= 0)))
    if condition == "object_set":  # the order of a scene's objects does not change its label
        assert torch.equal(labels, scene_labels(scenes.counts, scenes.colours.flip(1), condition, 3))


def test_labels_asking_cycle_through_the_sets_of_a_count():
    asked = labels_asking(2, 20, "object_set", 3)
    sets = [object_set_of(int(a), "object_set", 3) for a in asked]
    assert all(n == 2 for n, _ in sets) and len({c for _, c in sets[:15]}) == 15 and sets[15] == sets[0]
    assert labels_asking(3, 4, "count", 3).tolist() == [2, 2, 2, 2]


def test_bad_condition_and_label_are_named():
    with pytest.raises(ValueError, match="condition"):
        num_labels("colour", 3)
    with pytest.raises(ValueError, match="outside"):
        object_set_of(41, "object_set", 3)
