"""The FID Inception network and its preprocessing, against the reference implementations.

The references are the installed packages' own code, never a download, with RANDOM weights
(the same tensors loaded into both networks):

- torch-fidelity's ``FeatureExtractorInceptionV3`` (TF1 resize, the TF graph's normalisation), for
  ``resize="tf1"``. Its package ``__init__`` imports torchvision-dependent extractors (CLIP, VGG),
  so the module is imported from the installed package folder without running that ``__init__``;
  the inception module itself needs only torch.
- pytorch-fid's ``InceptionV3`` (``F.interpolate`` resize, ``2x - 1``), for ``resize="pytorch-fid"``.
  Its module imports torchvision and subclasses torchvision's InceptionA/C/E for their
  constructors only; a stub ``torchvision`` supplies those constructors from torch-fidelity (copies
  of torchvision's) and the network skeleton; the forward code under test is pytorch-fid's own.

Both references declare torchvision as a dependency, so they are not in the ``test`` extra:
``pip install --no-deps torch-fidelity==0.4.0 pytorch-fid==0.3.0`` (the tests skip without them).
"""
import importlib
import importlib.util
import sys
import types

import pytest
import torch

from difflab.eval.inception import (
    WEIGHTS_FILE,
    FIDInceptionV3,
    InceptionFeatures,
    convert_inception_weights,
    inception_preprocess,
    load_inception,
    load_inception_state_dict,
    resize_bilinear_tf1,
)


# ---- the references, imported from the installed packages -----------------------------------------
def _swap_modules(prefixes, replacement):
    """Replace every sys.modules entry under ``prefixes`` with ``replacement``; return the old ones."""
    old = {k: v for k, v in sys.modules.items() if any(k == p or k.startswith(p + ".") for p in prefixes)}
    for k in old:
        del sys.modules[k]
    sys.modules.update(replacement)
    return old


def _restore_modules(prefixes, old):
    for k in [k for k in sys.modules if any(k == p or k.startswith(p + ".") for p in prefixes)]:
        del sys.modules[k]
    sys.modules.update(old)


@pytest.fixture(scope="module")
def tf_inception():
    """torch_fidelity.feature_extractor_inceptionv3, without the package __init__ (torchvision)."""
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        pytest.skip("optional parity peer torch-fidelity is absent; the README's test command installs it "
                    "(pip install --no-deps torch-fidelity==0.4.0)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    old = _swap_modules(["torch_fidelity"], {"torch_fidelity": package})
    try:
        return importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    finally:
        _restore_modules(["torch_fidelity"], old)


def _random_fid_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random but well-scaled weights: He-normal convs, batch norms near identity, so activations
    neither vanish nor explode through the 40-odd layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in FIDInceptionV3().state_dict().items():
        if k.endswith("num_batches_tracked"):
            state[k] = v
        elif k.endswith("conv.weight"):
            state[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
        elif k.endswith("running_var"):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith("bn.weight"):
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k == "fc.weight":
            state[k] = torch.randn(v.shape, generator=g) / 2048**0.5
        else:  # bn.bias, running_mean, fc.bias
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    torch.save(_random_fid_state(), path)
    return path


@pytest.fixture(scope="module")
def images_uint8():
    """Two 32x32 RGB images with 8-bit levels, so the uint8 reference sees exactly our inputs."""
    return torch.randint(0, 256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def _to_unit(images_uint8):
    return images_uint8.float() / 127.5 - 1  # difflab's [-1, 1]


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- resize -------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(32, 32), (8, 8), (37, 50), (400, 320), (299, 299)])
def test_resize_tf1_matches_torch_fidelity(tf_inception, shape):
    x = 255 * torch.rand(2, 3, *shape, generator=torch.Generator().manual_seed(2))
    ref = tf_inception.interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False)
    out = resize_bilinear_tf1(x, 299)
    assert out.shape == (2, 3, 299, 299)
    assert torch.equal(out, ref)  # the same float32 arithmetic in the same order: bit-exact


def test_resize_tf1_known_values():
    # 2 -> 4 pixels: TF1 samples at i * 2/4 = 0, 0.5, 1, 1.5 with the last tap clamped to the edge
    x = torch.tensor([[[[0.0, 10.0]]]])
    assert resize_bilinear_tf1(x, (1, 4)).flatten().tolist() == [0.0, 5.0, 10.0, 10.0]


def test_grayscale_is_repeated_to_rgb():
    g = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    for resize in ("tf1", "pytorch-fid"):
        assert torch.equal(inception_preprocess(g, resize), inception_preprocess(g.repeat(1, 3, 1, 1), resize))
    with pytest.raises(ValueError, match="resize"):
        inception_preprocess(g, "nearest")
    with pytest.raises(ValueError, match="shape"):
        inception_preprocess(torch.zeros(2, 4, 8, 8))


# ---- the network, against torch-fidelity (resize="tf1") ----------------------------------------------
def test_features_and_logits_match_torch_fidelity(tf_inception, weights, images_uint8):
    ref = tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048", "logits_unbiased", "logits"], feature_extractor_weights_path=str(weights)
    )
    with torch.no_grad():
        f_ref, lu_ref, l_ref = ref(images_uint8)
        ours = InceptionFeatures(weights, resize="tf1")
        f, lu = ours.features_and_logits(_to_unit(images_uint8))
        l_biased = ours.logits(_to_unit(images_uint8), bias=True)
    assert f.shape == (2, 2048) and lu.shape == (2, 1008)
    assert f_ref.std() > 0.1  # the random network's features are not degenerate
    err = _rel_err(f, f_ref)
    print(f"torch-fidelity parity: max |features - reference| = {(f - f_ref).abs().max():.2e}, "
          f"relative to max |reference| {err:.2e}")
    assert err < 1e-5
    assert _rel_err(lu, lu_ref) < 1e-5
    assert _rel_err(l_biased, l_ref) < 1e-5


def test_float64_features_are_batch_invariant(weights, images_uint8):
    # float32 CPU convolutions change by ~1e-6 with the batch size; float64 makes FID batch-proof
    ours = InceptionFeatures(weights, dtype=torch.float64)
    with torch.no_grad():
        f2 = ours(_to_unit(images_uint8))
        f1 = ours(_to_unit(images_uint8[1:]))
        f32 = InceptionFeatures(weights)(_to_unit(images_uint8[1:]))
    assert f2.dtype == torch.float64
    assert _rel_err(f1[0], f2[1]) < 1e-12
    assert _rel_err(f32.double(), f1) < 1e-5


# ---- against pytorch-fid (resize="pytorch-fid") --------------------------------------------------
@pytest.fixture(scope="module")
def pytorch_fid_reference(tf_inception, weights):
    """pytorch-fid's InceptionV3([3]) holding our random weights (see the module docstring)."""
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("optional parity peer pytorch-fid is absent; the README's test command installs it "
                    "(pip install --no-deps pytorch-fid==0.3.0)")
    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.99"
    tv.models = types.ModuleType("torchvision.models")
    tv.models.inception = types.ModuleType("torchvision.models.inception")
    tv.models.inception.InceptionA = tf_inception.InceptionA     # constructors as torchvision's
    tv.models.inception.InceptionC = tf_inception.InceptionC
    tv.models.inception.InceptionE = tf_inception.InceptionE_1
    tv.models.inception_v3 = lambda **kwargs: tf_inception.FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights))
    stubs = {"torchvision": tv, "torchvision.models": tv.models, "torchvision.models.inception": tv.models.inception}
    old = _swap_modules(["torchvision", "pytorch_fid"], stubs)
    try:
        module = importlib.import_module("pytorch_fid.inception")
        state = torch.load(weights, weights_only=True)
        module.load_state_dict_from_url = lambda *args, **kwargs: state    # never a download
        return module.InceptionV3([3]).eval()
    finally:
        _restore_modules(["torchvision", "pytorch_fid"], old)


def test_features_match_pytorch_fid(pytorch_fid_reference, weights, images_uint8):
    # load from the wrapper's own state dict: exercises the "blocks.i.j." key map; it has no fc
    ours = InceptionFeatures(pytorch_fid_reference.state_dict(), resize="pytorch-fid")
    assert not ours.has_logits
    with pytest.raises(ValueError, match="no fc"):
        ours.logits(_to_unit(images_uint8[:1]))
    with torch.no_grad():
        f_ref = pytorch_fid_reference(images_uint8.float() / 255)[0].flatten(1)
        f = ours(_to_unit(images_uint8))
        f_tf1 = InceptionFeatures(weights, resize="tf1")(_to_unit(images_uint8))
    err = _rel_err(f, f_ref)
    print(f"pytorch-fid parity: max |features - reference| = {(f - f_ref).abs().max():.2e}, "
          f"relative to max |reference| {err:.2e}")
    assert err < 1e-5
    # the two recipes differ at 32x32 by far more than the tolerance: the test tells them apart
    assert _rel_err(f_tf1, f_ref) > 1e-3


# ---- weights files ------------------------------------------------------------------------------
def test_missing_weights_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE) as info:
        InceptionFeatures(tmp_path / "nowhere.pth")
    assert "nowhere.pth" in str(info.value) and "--weights" in str(info.value)
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_inception(None)


def test_registered_as_the_inception_extractor(weights):
    from difflab.eval.features import extractor_identity, load_extractor

    extractor = load_extractor("inception", weights)
    assert isinstance(extractor, InceptionFeatures) and extractor.resize == "tf1"
    identity = extractor_identity(extractor)
    assert identity["name"] == "inception-v3-fid" and "TF1" in identity["preprocessing"]


def test_wrong_state_dict_is_refused(tmp_path):
    path = tmp_path / "not_inception.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ValueError, match="not an FID Inception state dict"):
        InceptionFeatures(path)
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")  # a pickled module: weights_only refuses it
    with pytest.raises(ValueError, match="not a plain state dict"):
        InceptionFeatures(tmp_path / "module.pth")


def test_safetensors_conversion_keeps_the_tensors(weights, tmp_path):
    out = convert_inception_weights(weights, tmp_path / "inception.safetensors")
    a, b = load_inception_state_dict(weights), load_inception_state_dict(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "Mixed_7c.branch_pool.conv.weight" in b and not any(k.endswith("num_batches_tracked") for k in b)
