"""CLIP and DINOv2 feature extractors: tiny random transformers models saved to a folder (no
download), loaded through difflab, checked against transformers' own feature functions and the
preprocessing against the PIL references (transformers' CLIPImageProcessor PIL backend; PIL's
bicubic resize as dgm-eval uses it for DINOv2)."""
import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from difflab.eval.clip import CLIPFeatures, load_clip, resize_crop_normalize  # noqa: E402
from difflab.eval.dinov2 import IMAGENET_MEAN, IMAGENET_STD, dinov2_preprocess, load_dinov2  # noqa: E402

CHARS = "abcdefghijklmnopqrstuvwxyz"
MERGES = ["a t</w>", "c at</w>", "d o", "do g</w>", "r e", "re d</w>"]


def _write_tokenizer(folder):
    """A minimal CLIP BPE vocabulary: letters, letters ending a word, a few merges, the specials."""
    vocab = {}
    for token in [*CHARS, *(c + "</w>" for c in CHARS), *(m.replace(" ", "") for m in MERGES),
                  "<|startoftext|>", "<|endoftext|>"]:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tok.save_pretrained(str(folder))
    return tok


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    tok = _write_tokenizer(folder)
    common = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **common),
        vision_config=dict(image_size=32, patch_size=8, **common),
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.CLIPModel(config).save_pretrained(str(folder))
    # the preprocessing sizes for this 32-pixel model, as a real checkpoint's folder has them
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "image_processor_type": "CLIPImageProcessor"}))
    return folder


@pytest.fixture(scope="module")
def clip(clip_dir):
    return load_clip(clip_dir)


def _texture(hw, seed):
    """An 8-bit (H, W, 3) noise texture in [48, 208]: bicubic overshoot stays inside [0, 255], so
    PIL's clamping between passes never acts (on full-range noise it does, and the two paths then
    differ by up to ~20 levels at isolated pixels)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(48, 209, (*hw, 3), generator=g, dtype=torch.uint8).numpy()


def _images(n, h, w, seed=0, channels=3):
    return torch.rand(n, channels, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---- CLIP --------------------------------------------------------------------------------------
def test_clip_image_embeddings_equal_transformers(clip, clip_dir):
    model = transformers.CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    images = _images(3, 40, 48)
    pixels = clip.preprocess(images)
    assert pixels.shape == (3, 3, 32, 32)
    with torch.no_grad():
        ours = clip(images)
        ref = model.get_image_features(pixel_values=pixels)
    ref = getattr(ref, "pooler_output", ref)   # a tensor in transformers 4, a ModelOutput in 5
    assert ours.shape == (3, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert (ours[0] - ours[1]).abs().max() > 1e-3   # different images, different embeddings


def test_clip_text_embeddings_equal_transformers(clip, clip_dir):
    model = transformers.CLIPModel.from_pretrained(str(clip_dir), local_files_only=True).eval()
    tok = transformers.CLIPTokenizer.from_pretrained(str(clip_dir), local_files_only=True)
    prompts = ["a cat", "a red dog and a cat", "red"]
    with torch.no_grad():
        ours = clip.encode_text(prompts)
        ref = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
        alone = clip.encode_text(["a cat"])
    ref = getattr(ref, "pooler_output", ref)
    assert ours.shape == (3, 16)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # padding to the batch's longest prompt changes nothing (causal mask, pooled at the end token)
    torch.testing.assert_close(alone[0], ours[0], rtol=1e-5, atol=1e-5)
    assert (ours[0] - ours[2]).abs().max() > 1e-3


@pytest.mark.parametrize("hw", [(64, 80), (300, 260), (224, 224)])
def test_clip_preprocessing_matches_clip_image_processor(hw):
    """Our torch path vs transformers' PIL CLIPImageProcessor (OpenAI defaults: 224, bicubic) on
    the same 8-bit image: the same filter; PIL rounds to 8 bits after each of its two passes."""
    processor_cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor = processor_cls()
    rgb = _texture(hw, seed=1)
    ref = processor(images=PIL_Image.fromarray(rgb), return_tensors="pt")["pixel_values"].float()
    x01 = torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255
    ours = resize_crop_normalize(x01, 224, 224, processor.image_mean, processor.image_std).float()
    assert ours.shape == ref.shape == (1, 3, 224, 224)
    err = (ours - ref).abs()
    one_level = 1 / 255 / min(processor.image_std)   # one 8-bit level in normalised units, ~0.0146
    print(f"CLIP preprocessing {hw}: max |ours - PIL| = {err.max():.4f}, mean = {err.mean():.5f} "
          f"(one 8-bit level = {one_level:.4f})")
    assert err.max() <= 1.5 * one_level and err.mean() <= 0.5 * one_level


def test_clip_grey_and_folder_errors(clip, tmp_path):
    grey = _images(2, 32, 32, channels=1)
    torch.testing.assert_close(clip(grey), clip(grey.repeat(1, 3, 1, 1)))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_clip(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_clip(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_clip("openai/clip-vit-base-patch32")   # a hub name is not a folder: no download


def test_registered_as_clip_and_dinov2_extractors(clip_dir, dinov2_dir):
    from difflab.eval.features import extractor_identity, load_extractor

    clip = load_extractor("clip", clip_dir)
    assert callable(clip.encode_text) and extractor_identity(clip)["name"] == f"clip-{clip_dir.name}"
    assert extractor_identity(load_extractor("dinov2", dinov2_dir))["name"].startswith("dinov2-")


def test_clip_without_tokenizer_still_gives_image_features(clip_dir, tmp_path):
    for f in ("config.json", "model.safetensors", "preprocessor_config.json"):
        (tmp_path / f).write_bytes((clip_dir / f).read_bytes())
    images_only = CLIPFeatures(tmp_path)
    assert images_only(_images(1, 32, 32)).shape == (1, 16)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        images_only.encode_text(["a cat"])


# ---- DINOv2 ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_dinov2")
    config = transformers.Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.Dinov2Model(config).save_pretrained(str(folder))
    return folder


def test_dinov2_features_equal_transformers(dinov2_dir):
    dino = load_dinov2(dinov2_dir)
    model = transformers.Dinov2Model.from_pretrained(str(dinov2_dir), local_files_only=True).eval()
    images = _images(2, 48, 40)
    pixels = dino.preprocess(images)
    assert pixels.shape == (2, 3, 224, 224)
    with torch.no_grad():
        ours = dino(images)
        out = model(pixel_values=pixels)
    assert ours.shape == (2, 32)
    torch.testing.assert_close(ours, out.pooler_output, rtol=1e-5, atol=1e-5)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_dinov2(dinov2_dir / "missing")


@pytest.mark.parametrize("hw", [(32, 32), (256, 320)])
def test_dinov2_preprocessing_matches_pil_bicubic(hw):
    """dgm-eval's reference resize is PIL's bicubic to 224x224 on the 8-bit image; EDM2's (ours)
    is torch's antialiased bicubic on floats: the same filter up to PIL's 8-bit rounding."""
    rgb = _texture(hw, seed=2)
    pil = np.array(PIL_Image.fromarray(rgb).resize((224, 224), PIL_Image.Resampling.BICUBIC))
    ref = (torch.from_numpy(pil).permute(2, 0, 1)[None].double() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x01 = torch.from_numpy(rgb).permute(2, 0, 1)[None].double() / 255
    ours = dinov2_preprocess(x01)
    err = (ours - ref).abs()
    one_level = 1 / 255 / min(IMAGENET_STD)
    print(f"DINOv2 preprocessing {hw}: max |ours - PIL| = {err.max():.4f}, mean = {err.mean():.5f}")
    assert err.max() <= 1.5 * one_level and err.mean() <= 0.5 * one_level
