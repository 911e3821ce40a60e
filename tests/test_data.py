"""Data: the embedded digits, image folders, 2-D toy sets."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from difflab.data import (gaussian_mixture, load_digits, load_image_folder, moons, ring_means, same_class_partner,
                          stratified_split, swiss_roll)

sklearn = pytest.importorskip("sklearn")


# ---- digits ---------------------------------------------------------------------------------
def test_digits_shape_range_labels():
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.long
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert set(y.tolist()) == set(range(10))
    # pixel value v in 0..16 maps to v / 8 - 1, so 17 levels exactly
    assert torch.equal(((x + 1) * 8).round(), (x + 1) * 8)
    raw = sklearn.datasets.load_digits()
    assert torch.allclose(x[:, 0], torch.from_numpy(raw.images).float() / 8 - 1)
    assert torch.equal(y, torch.from_numpy(raw.target).long())


def test_digits_split_stratified_disjoint_deterministic():
    _, y = load_digits()
    train, test = stratified_split(y, 0.2, seed=0)
    assert len(train) + len(test) == 1797
    assert len(set(train.tolist()) | set(test.tolist())) == 1797          # disjoint and covering
    counts, test_counts = y.bincount(), y[test].bincount(minlength=10)
    assert torch.all((test_counts - 0.2 * counts).abs() <= 0.5)            # every class held out at 20%
    xtr, ytr = load_digits(split="train")
    xte, yte = load_digits(split="test")
    assert len(xtr) == len(train) and len(xte) == len(test) == 359
    x, _ = load_digits()
    assert torch.equal(xte, x[test]) and torch.equal(yte, y[test])
    assert torch.equal(load_digits(split="test")[0], xte)                   # same seed, same split
    other = stratified_split(y, 0.2, seed=1)[1]
    assert len(other) == len(test) and not torch.equal(other, test)        # the seed matters
    with pytest.raises(ValueError):
        load_digits(split="val")


@pytest.mark.parametrize("size", [16, 32])
def test_digits_upscaling_round_trip(size):
    x, _ = load_digits()
    up, _ = load_digits(size)
    assert up.shape == (1797, 1, size, size)
    assert torch.allclose(F.adaptive_avg_pool2d(up, 8), x, atol=1e-6)      # nearest: exact
    smooth, _ = load_digits(size, mode="bilinear")
    assert smooth.shape == (1797, 1, size, size) and smooth.abs().max() <= 1
    err = (F.adaptive_avg_pool2d(smooth, 8) - x).pow(2).mean() / x.var()
    assert err < 0.1                                                       # bilinear: approximately


# ---- image folders --------------------------------------------------------------------------
def _write(path, array, mode):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def test_image_folder_crop_resize_range(tmp_path):
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255                    # the centred 20x20 square is white, the sides black
    _write(tmp_path / "a.png", wide, "RGB")
    grey = np.full((16, 16), 0, np.uint8)
    _write(tmp_path / "sub" / "b.png", grey, "L")
    with pytest.warns(UserWarning, match="2 sizes"):  # 40x20 and 16x16, RGB and L: one warning
        x = load_image_folder(tmp_path, 8)
    assert x.shape == (2, 3, 8, 8) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(3, 8, 8))      # centre crop kept only the white square
    assert torch.allclose(x[1], -torch.ones(3, 8, 8))     # grey image promoted to RGB, black -> -1
    with pytest.warns(UserWarning, match="2 modes"):
        g = load_image_folder(tmp_path, 4, channels=1)
    assert g.shape == (2, 1, 4, 4) and g.min() >= -1 and g.max() <= 1


def test_image_folder_labels_from_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in [("cat", 2), ("dog", 3)]:
        for i in range(n):
            _write(tmp_path / name / f"{i}.png", rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    x, labels, names = load_image_folder(tmp_path, 6, with_labels=True)
    assert names == ["cat", "dog"]
    assert x.shape == (5, 3, 6, 6)
    assert labels.tolist() == [0, 0, 1, 1, 1]
    _write(tmp_path / "loose.png", np.zeros((4, 4), np.uint8), "L")
    with pytest.raises(ValueError, match="lie directly"):
        load_image_folder(tmp_path, 6, with_labels=True)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing", 8)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(NotADirectoryError):
        load_image_folder(tmp_path / "f.txt", 8)
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path, 8)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(tmp_path, 8, channels=2)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could not read"):
        load_image_folder(tmp_path, 8)


# ---- toy sets -------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [moons, swiss_roll, gaussian_mixture])
def test_toy_shape_determinism_unit_variance(make):
    a = make(20_000, generator=torch.Generator().manual_seed(0))
    b = make(20_000, generator=torch.Generator().manual_seed(0))
    c = make(20_000, generator=torch.Generator().manual_seed(1))
    assert a.shape == (20_000, 2) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.mean(0), torch.zeros(2), atol=0.05)
    assert torch.allclose(a.var(0), torch.ones(2), atol=0.06)


def test_toy_labels_and_mixture():
    g = torch.Generator().manual_seed(0)
    x, label = moons(4000, noise=0.0, generator=g, return_labels=True)
    assert set(label.tolist()) == {0, 1}
    # without noise the moons are separated by the line through their centres: upper moon above
    assert (x[label == 0, 1].min() > x[label == 1, 1].min()) and (x[label == 1, 1].max() < x[label == 0, 1].max())
    means = ring_means(4, radius=3.0)
    x, k = gaussian_mixture(8000, means, std=0.01, generator=g, return_labels=True)
    assert torch.allclose(x.double(), means[k], atol=0.06)                # each point next to its component
    assert torch.allclose(k.bincount().double() / 8000, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03)


def test_same_class_partner_is_another_example_of_the_same_class():
    labels = torch.tensor([0, 1, 0, 2, 1, 2, 0, 1])
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = same_class_partner(labels, g)
        assert torch.equal(labels[p], labels) and bool((p != torch.arange(len(labels))).all())
    with pytest.raises(ValueError, match="class 3 has one example"):
        same_class_partner(torch.tensor([0, 0, 3]), g)
