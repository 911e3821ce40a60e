"""The embedded scenes: depth exact to the geometry, masks, determinism and the split."""
import numpy as np
import pytest
import torch

from difflab.data.scenes import (KINDS, SceneObject, background_depth, camera, depth_to_unit, load_scenes,
                                 object_boxes, render, rerender_scenes, shape_bitmap, unit_to_depth)


def _on_box_surface(p: np.ndarray, boxes: np.ndarray, tol: float = 1e-9) -> np.ndarray:
    """(P,) bool: the point lies in the closure of some box and on one of its faces."""
    lo, hi = boxes[None, :, :3], boxes[None, :, 3:]
    inside = ((p[:, None] >= lo - tol) & (p[:, None] <= hi + tol)).all(-1)
    on_face = (np.isclose(p[:, None], lo, atol=tol) | np.isclose(p[:, None], hi, atol=tol)).any(-1)
    return (inside & on_face).any(1)


def _strictly_inside(p: np.ndarray, boxes: np.ndarray, tol: float = 1e-7) -> np.ndarray:
    lo, hi = boxes[None, :, :3], boxes[None, :, 3:]
    return ((p[:, None] > lo + tol) & (p[:, None] < hi - tol)).all(-1).any(1)


def test_empty_room_depth_is_the_ground_and_the_wall_exactly():
    cam = camera(32)
    depth = background_depth(cam).reshape(-1)
    points = cam.rays() * depth[:, None]  # the 3-D point each pixel sees
    on_ground = np.isclose(points[:, 1], -cam.height, atol=1e-12) & (points[:, 2] <= cam.wall + 1e-12)
    on_wall = np.isclose(points[:, 2], cam.wall, atol=1e-12) & (points[:, 1] >= -cam.height - 1e-12)
    assert (on_ground | on_wall).all()
    assert on_ground.sum() > 0 and on_wall.sum() > 0
    # ground depth falls as 1 / (v + 0.5 - cy) down the image, and is the same along a row
    v = 31
    assert depth.reshape(32, 32)[v, 5] == pytest.approx(cam.f * cam.height / (v + 0.5 - cam.cy), abs=1e-12)
    assert (depth.reshape(32, 32) == depth.reshape(32, 32)[:, :1]).all()


def test_object_depth_is_the_first_surface_on_each_ray():
    cam = camera(32)
    digit = np.zeros((8, 8), bool)
    digit[1:7, 2:6] = True
    digit[3:5, 3:5] = False  # a hole the rays pass through
    objects = [SceneObject(0, 0, shape_bitmap("box"), 0.8, -0.7, 2.0), SceneObject(4, 1, digit, 1.0, 1.2, 3.0),
               SceneObject(1, 2, shape_bitmap("disc"), 0.9, 0.2, 1.8)]
    image, depth, masks = render(objects, cam)
    rays, d = cam.rays(), depth.reshape(-1)
    points = rays * d[:, None]
    seen = np.zeros(len(d), bool)
    for obj, mask in zip(objects, masks):
        boxes = object_boxes(obj, cam)
        m = mask.reshape(-1)
        assert m.sum() > 0
        assert _on_box_surface(points[m], boxes).all()  # each object pixel sees a face of that object
        front = np.isclose(points[m, 2], obj.z, atol=1e-12)
        assert front.sum() > 0 and (d[m][front] == pytest.approx(obj.z, abs=1e-12))
        seen |= m
    # nothing lies in front of the surface a pixel sees: points just before it are in no object
    before = rays * (d * (1 - 1e-6))[:, None]
    for obj in objects:
        assert not _strictly_inside(before, object_boxes(obj, cam)).any()
    # pixels of no object see the empty room exactly
    assert np.array_equal(d[~seen], background_depth(cam).reshape(-1)[~seen])
    assert not (masks.sum(0) > 1).any()  # masks are disjoint
    assert image.min() >= 0 and image.max() <= 1


def test_scenes_are_deterministic_split_and_consistent():
    a = load_scenes(12, size=16, split="train", seed=3, max_objects=3)
    b = load_scenes(12, size=16, split="train", seed=3, max_objects=3)
    c = load_scenes(12, size=16, split="test", seed=3, max_objects=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.depth, b.depth)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (12, 3, 16, 16) and a.masks.shape == (12, 3, 16, 16)
    assert a.images.min() >= -1 and a.images.max() <= 1
    assert torch.equal(a.masks.flatten(2).any(2).sum(1), a.counts)  # every object is visible
    assert ((a.kinds >= 0).sum(1) == a.counts).all() and (a.kinds < len(KINDS)).all()
    for colours, n in zip(a.colours, a.counts):  # distinct colours within a scene
        assert len(set(colours[:n].tolist())) == int(n)
    seg = a.segmentation()
    assert torch.equal(seg > 0, a.masks.any(1))
    unit = depth_to_unit(a.depth, 16)
    assert unit.min() >= -1 - 1e-6 and unit.max() <= 1 + 1e-6
    assert torch.allclose(unit_to_depth(unit, 16), a.depth, atol=1e-5)


def test_rerendered_scenes_drop_or_swap_exactly_one_object():
    kw = dict(size=16, split="test", max_objects=3)
    scenes = load_scenes(40, **kw)
    keep_all = torch.full((40,), -1)
    assert torch.equal(rerender_scenes(40, keep_all, **kw), scenes.images)  # nothing dropped: the same scenes
    drop = torch.zeros(40, dtype=torch.long)
    fewer = rerender_scenes(40, drop, **kw)
    changed = (fewer != scenes.images).any(1)
    assert not (changed & ~scenes.masks[:, 0]).any()  # only where the dropped object was seen
    assert changed.flatten(1).any(1).all()  # and every dropped object is gone from somewhere
    one = torch.nonzero(scenes.counts == 1).flatten()
    room = torch.from_numpy(render([], camera(16))[0]) * 2 - 1
    assert len(one) and torch.equal(fewer[one], room.expand(len(one), -1, -1, -1))  # one object: the empty room
    self_swap = torch.stack([torch.arange(40), torch.zeros(40, dtype=torch.long)], 1)  # drop object 0, put it back
    assert torch.equal(rerender_scenes(40, drop, self_swap, **kw), scenes.images)
    donor = torch.stack([(torch.arange(40) + 1) % 40, torch.zeros(40, dtype=torch.long)], 1)
    swapped = rerender_scenes(40, drop, donor, **kw)
    assert not torch.equal(swapped, fewer) and not torch.equal(swapped, scenes.images)
    with pytest.raises(ValueError, match="is not an object"):
        rerender_scenes(40, torch.full((40,), 3), **kw)


@pytest.mark.parametrize("kwargs, phrase", [(dict(split="val"), "split"), (dict(size=10), "size"),
                                            (dict(max_objects=9), "max_objects"), (dict(min_objects=0), "min_objects")])
def test_bad_arguments_are_named(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        load_scenes(4, **kwargs)
