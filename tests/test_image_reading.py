"""Image folders read every file as it looks (difflab/data/folder.py): 16-bit and float images
scaled rather than clipped, palettes, alpha composited over white, CMYK, 1-bit, EXIF rotations;
unreadable files named (stop) or skipped with one warning; one warning for mixed sizes or modes."""
import json
import re
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from difflab.cli import main
from difflab.data import ImageReadError, load_image, load_image_folder
from difflab.eval import load_images

STEP = 1 / 127.5  # one 8-bit level in [-1, 1]


def unit(v, top=255.0):
    """``v`` in 0..top as difflab's [-1, 1]."""
    return torch.as_tensor(np.asarray(v, dtype=np.float64) / top * 2 - 1, dtype=torch.float32)


def png16_rgb(path, array):
    """A 16-bit-per-channel RGB PNG written by hand (Pillow cannot write one)."""
    h, w, _ = array.shape
    raw = b"".join(b"\0" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def random_png(path, size=32, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Modes: each image built here, its pixels checked


def test_16_bit_grey_png_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 1000, 20000, 32768], [40000, 50000, 65000, 65535]] * 2, dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    x = load_image(tmp_path / "g16.png", 4, channels=1)  # 4x4, no resize
    torch.testing.assert_close(x[0], unit(values, 65535.0), atol=1e-6, rtol=0)
    assert float(x[0, 0, 1]) < -0.9 and abs(float(x[0, 0, 3])) < 1e-4  # 1000 nearly black, 32768 mid grey: not white
    rgb = load_image(tmp_path / "g16.png", 4, channels=3)
    assert torch.equal(rgb, x.expand(3, 4, 4))


def test_32_bit_integer_images_in_16_bit_range_are_scaled_and_others_refused(tmp_path):
    values = np.array([[0, 65535], [1000, 30000]], dtype=np.int32)
    Image.fromarray(values).save(tmp_path / "i.tif")
    with Image.open(tmp_path / "i.tif") as im:
        assert im.mode == "I"
    torch.testing.assert_close(load_image(tmp_path / "i.tif", 2, 1)[0], unit(values, 65535.0), atol=1e-6, rtol=0)
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "big.tif")
    with pytest.raises(ImageReadError, match=r"big\.tif.*70000"):
        load_image(tmp_path / "big.tif", 1, 1)


def test_16_bit_rgb_png_is_scaled_to_8_bits(tmp_path):
    values = np.zeros((2, 2, 3), np.uint16)
    values[...] = [65535, 32768, 1000]
    png16_rgb(tmp_path / "rgb16.png", values)
    x = load_image(tmp_path / "rgb16.png", 2)
    want = unit(values.transpose(2, 0, 1), 65535.0)
    assert float((x - want).abs().max()) <= STEP  # within one 8-bit level: Pillow keeps the top byte


def test_float_tiff_is_read_as_0_to_1_and_out_of_range_refused(tmp_path):
    values = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    torch.testing.assert_close(load_image(tmp_path / "f.tif", 2, 1)[0], unit(values, 1.0), atol=1e-6, rtol=0)
    Image.fromarray(values * 255).save(tmp_path / "f255.tif")
    with pytest.raises(ImageReadError, match=r"f255\.tif.*255"):
        load_image(tmp_path / "f255.tif", 2, 1)
    Image.fromarray(np.array([[0.5, np.nan]], np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(ImageReadError, match="NaN"):
        load_image(tmp_path / "nan.tif", 1, 1)


def test_palette_with_and_without_transparency(tmp_path):
    p = Image.new("P", (2, 2))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.save(tmp_path / "p.png")
    x = load_image(tmp_path / "p.png", 2)
    assert x[:, 0, 0].tolist() == [1, -1, -1] and x[:, 0, 1].tolist() == [-1, -1, 1]  # red, blue
    p.info["transparency"] = 1  # palette entry 1 (blue) is transparent
    p.save(tmp_path / "pt.png")
    x = load_image(tmp_path / "pt.png", 2)
    assert x[:, 0, 0].tolist() == [1, -1, -1] and x[:, 0, 1].tolist() == [1, 1, 1]  # over white


def test_grey_alpha_and_rgba_are_composited_over_white(tmp_path):
    la = np.zeros((2, 2, 2), np.uint8)
    la[..., 1] = [[0, 255], [128, 0]]  # black, alpha 0 / 255 / 128
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    x = load_image(tmp_path / "la.png", 2, channels=1)[0]
    assert x[0, 0] == 1 and x[0, 1] == -1 and x[1, 1] == 1                  # transparent -> white
    assert abs(float(x[1, 0]) - float(unit(127))) <= STEP                     # half -> mid grey
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[..., 3] = [[0, 255], [128, 0]]  # red, alpha 0 / 255 / 128
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "rgba.png")
    x = load_image(tmp_path / "rgba.png", 2)
    assert x[:, 0, 0].tolist() == [1, 1, 1] and x[:, 0, 1].tolist() == [1, -1, -1]
    assert x[0, 1, 0] == 1 and abs(float(x[1, 1, 0]) - float(unit(127))) <= STEP
    grey = load_image(tmp_path / "rgba.png", 2, channels=1)[0]
    assert grey[0, 0] == 1  # the grey read composites the same way


@pytest.mark.parametrize("suffix,tol", [(".tif", 0.0), (".jpg", 4 * STEP)])
def test_cmyk(tmp_path, suffix, tol):
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(tmp_path / f"c{suffix}", quality=100)  # pure cyan
    x = load_image(tmp_path / f"c{suffix}", 8)
    want = torch.tensor([-1.0, 1.0, 1.0])[:, None, None].expand(3, 8, 8)
    assert float((x - want).abs().max()) <= tol


def test_one_bit(tmp_path):
    bits = np.array([[0, 1], [1, 0]], dtype=bool)
    Image.fromarray(bits).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as im:
        assert im.mode == "1"
    assert load_image(tmp_path / "b.png", 2, 1)[0].tolist() == [[-1, 1], [1, -1]]


@pytest.mark.parametrize("orientation,top,bottom,left,right", [
    (6, -1, 1, None, None),   # stored rotated: turned 90 degrees clockwise, the black left side is on top
    (8, 1, -1, None, None),   # 90 counter-clockwise: black at the bottom
    (3, None, None, 1, -1),   # 180: black on the right
])
def test_exif_orientation_is_applied(tmp_path, orientation, top, bottom, left, right):
    stored = np.full((8, 16), 255, np.uint8)
    stored[:, :8] = 0  # 16 wide, 8 tall: black left half, white right half
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(stored).save(tmp_path / "r.jpg", exif=exif, quality=95)
    x = load_image(tmp_path / "r.jpg", 8, channels=1)[0]  # the centred 8x8 of what a viewer shows
    if top is not None:
        assert float((x[0] - top).abs().max()) < 0.2 and float((x[-1] - bottom).abs().max()) < 0.2
    else:
        assert float((x[:, 0] - left).abs().max()) < 0.2 and float((x[:, -1] - right).abs().max()) < 0.2


# ----------------------------------------------------------------------------------------------
# Unreadable files


def broken_files(folder):
    """{name: reason phrase} of four unreadable files written into ``folder``."""
    folder.mkdir(exist_ok=True)
    png = random_png(folder / "good.png").read_bytes()
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    random_png(folder / "tmp.jpg")
    jpg = (folder / "tmp.jpg").read_bytes()
    (folder / "tmp.jpg").unlink()
    (folder / "cut.jpg").write_bytes(jpg[: len(jpg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not a picture")
    (folder / "good.png").unlink()
    return {"cut.png": "truncated", "cut.jpg": "truncated", "empty.png": "empty", "text.png": "not an image format"}


def test_unreadable_files_are_named_with_the_reason(tmp_path):
    for name, reason in broken_files(tmp_path).items():
        with pytest.raises(ValueError, match=f"{name}.*{reason}"):
            load_image(tmp_path / name, 8)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # difflab never turns it on


def test_on_error_stop_names_the_file_and_skip_warns_once(tmp_path):
    broken_files(tmp_path)
    random_png(tmp_path / "a_good.png", 8, seed=1)
    random_png(tmp_path / "z_good.png", 8, seed=2)
    with pytest.raises(ImageReadError, match=r"cut\.jpg"):  # the first bad file, in sorted order
        load_image_folder(tmp_path, 8)
    with pytest.warns(UserWarning) as record:
        x = load_image_folder(tmp_path, 8, on_error="skip")
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert "skipped 4 of 6" in messages[0] and "cut.jpg" in messages[0] and "; ..." in messages[0]
    assert x.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x[1], load_image(tmp_path / "z_good.png", 8))
    with pytest.raises(ValueError, match="on_error"):
        load_image_folder(tmp_path, 8, on_error="ignore")


def test_skip_with_everything_unreadable_is_an_error(tmp_path):
    broken_files(tmp_path)
    with pytest.raises(ValueError, match="no readable images.*all 4"):
        load_image_folder(tmp_path, 8, on_error="skip")


def test_skip_keeps_labels_in_step_with_the_images(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        random_png(tmp_path / cls / "1.png", 8)
    (tmp_path / "cat" / "0.png").write_text("broken")
    with pytest.warns(UserWarning, match="skipped 1 of 3"):
        x, labels, names = load_image_folder(tmp_path, 8, with_labels=True, on_error="skip")
    assert names == ["cat", "dog"] and labels.tolist() == [0, 1] and len(x) == 2


def test_eval_names_an_unreadable_first_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a\.png"):
        load_images(tmp_path)


# ----------------------------------------------------------------------------------------------
# Mixed sizes and modes


def test_mixed_sizes_and_modes_warn_once_uniform_folders_do_not(tmp_path):
    uniform = tmp_path / "uniform"
    uniform.mkdir()
    for i in range(3):
        random_png(uniform / f"{i}.png", 12, seed=i)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image_folder(uniform, 8)
    Image.new("L", (20, 10)).save(uniform / "3.png")
    with pytest.warns(UserWarning) as record:
        load_image_folder(uniform, 8)
    assert len(record) == 1
    message = str(record[0].message)
    assert "2 sizes (12x12 (0.png), 20x10 (3.png))" in message and "2 modes (RGB (0.png), L (3.png))" in message
    assert "resized to 8x8" in message and "centre-cropped" in message


def test_mixed_sizes_alone_warn_about_sizes_only(tmp_path):
    random_png(tmp_path / "a.png", 12)
    random_png(tmp_path / "b.png", 16)
    with pytest.warns(UserWarning, match="2 sizes") as record:
        load_image_folder(tmp_path, 8)
    assert "modes" not in str(record[0].message)


# ----------------------------------------------------------------------------------------------
# The command line


def test_train_bad_images_skip_trains_on_the_rest_and_warns(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    random_png(data / "good.png", 8)
    (data / "bad.png").write_text("not a png")
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"train": {"steps": 2, "batch_size": 2, "checkpoint_every": 0, "progress": False}}))
    argv = ["train", "--config", str(cfg), "--preset", "tiny", "--device", "cpu", "--data", str(data), "--size", "8",
            "--out", str(tmp_path / "run")]
    assert main(argv) == 2  # stop is the default
    capsys.readouterr()
    assert main([*argv, "--bad-images", "skip"]) == 0
    err = capsys.readouterr().err  # one plain line: no file name, line number or source line
    assert re.search(r"^difflab train: warning: .*skipped 1 of 2 .*bad\.png", err, re.M) and ".py:" not in err
    assert (tmp_path / "run" / "checkpoint.safetensors").exists()
