"""FID's feature network: Inception-v3 (Szegedy et al. 2016) as frozen in TensorFlow's
``inception-2015-12-05`` graph, whose 2048-d pool3 features enter FID (Heusel et al. 2017, eq. 2)
and whose 1008 logits enter the Inception Score (Salimans et al. 2016, eq. 1).

This is the network of pytorch-fid's ``fid_inception_v3`` (the TF graph ported to PyTorch),
written in plain torch: the TF graph differs from torchvision's Inception-v3 in three places,
kept here as in the reference:

- the average pools of the A, C and first E blocks exclude the zero padding from the mean
  (``count_include_pad=False``, TF's ``SAME`` average pooling);
- the second E block (``Mixed_7c``) pools its fourth branch with a *max* pool;
- the classifier has 1008 outputs (1000 ImageNet classes plus 8 unused).

Preprocessing (:class:`InceptionFeatures`), two recipes:

- ``resize="tf1"`` (the default) is the TF graph's own: images as floats on the [0, 255] scale,
  ``tf.image.resize_bilinear`` of TF 1.x to 299x299 (``align_corners=False`` without half-pixel
  centres: output pixel i samples input coordinate ``i * in / out``), then ``(x - 128) / 128``.
  This is what TTUR (the authors' FID code) and the original IS code ran, so it is the recipe the
  published numbers come from; torch-fidelity reproduces it.
- ``resize="pytorch-fid"``: pytorch-fid's ``[0, 1] -> F.interpolate(bilinear, align_corners=False)
  -> 2x - 1``; its FIDs differ slightly from TTUR's when images are not already 299x299.

Weights are never downloaded: the user supplies pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``
(a plain state dict; torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` has the same
key names), or the same tensors as ``.safetensors`` (:func:`convert_inception_weights`).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
INPUT_SIZE = 299
RESIZE_MODES = ("tf1", "pytorch-fid")

# Key maps for foreign layouts, as data: prefix in the foreign state dict -> prefix here.
# pytorch-fid's weights file and torch-fidelity's use torchvision's names, which are ours; a state
# dict of pytorch-fid's *wrapper* module ``InceptionV3(...).state_dict()`` numbers its blocks
# (and has no ``fc``, so such weights give features but no logits).
PYTORCH_FID_BLOCKS_KEYS = {
    "blocks.0.0.": "Conv2d_1a_3x3.", "blocks.0.1.": "Conv2d_2a_3x3.", "blocks.0.2.": "Conv2d_2b_3x3.",
    "blocks.1.0.": "Conv2d_3b_1x1.", "blocks.1.1.": "Conv2d_4a_3x3.",
    "blocks.2.0.": "Mixed_5b.", "blocks.2.1.": "Mixed_5c.", "blocks.2.2.": "Mixed_5d.", "blocks.2.3.": "Mixed_6a.",
    "blocks.2.4.": "Mixed_6b.", "blocks.2.5.": "Mixed_6c.", "blocks.2.6.": "Mixed_6d.", "blocks.2.7.": "Mixed_6e.",
    "blocks.3.0.": "Mixed_7a.", "blocks.3.1.": "Mixed_7b.", "blocks.3.2.": "Mixed_7c.",
}


# ---- the network ---------------------------------------------------------------------------------
class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_tf(x):
    """TF's SAME 3x3 average pool: the zero padding does not count in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Szegedy et al. 2016, fig. 5): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 grid reduction: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3d, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Szegedy et al. 2016, fig. 6)."""

    def __init__(self, c_in: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                     self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 grid reduction: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks (Szegedy et al. 2016, fig. 7). The TF graph pools the
    fourth branch with an average pool in ``Mixed_7b`` (``pool="avg"``, pytorch-fid's
    FIDInceptionE_1) and with a max pool in ``Mixed_7c`` (``pool="max"``, FIDInceptionE_2)."""

    def __init__(self, c_in: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = _avg_pool_tf(x) if self.pool == "avg" else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([b1, b3, b3d, self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception-v3: normalised (N, 3, 299, 299) input -> pool3 features (N, 2048); ``fc``
    maps them to the graph's 1008 logits. Module names are torchvision's (pytorch-fid's weights)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))   # N x 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)                        # N x 64 x 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                       # N x 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)                        # N x 192 x 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                      self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)                                                    # ... N x 2048 x 8 x 8
        return F.adaptive_avg_pool2d(x, 1).flatten(1)                       # pool3: N x 2048


# ---- preprocessing -------------------------------------------------------------------------------
def resize_bilinear_tf1(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """TF 1.x ``tf.image.resize_bilinear(align_corners=False)``, the resize inside the FID graph:
    output pixel i samples input coordinate ``i * in / out`` (no half-pixel centres; the last rows
    and columns repeat the edge). Sample positions are computed in float32, as TF does."""
    h_out, w_out = (size, size) if isinstance(size, int) else size

    def taps(n_in: int, n_out: int):
        pos = torch.arange(n_out, dtype=torch.float32, device=x.device) * torch.tensor(n_in / n_out, dtype=torch.float32)
        lo = pos.floor().long()
        return lo, (lo + 1).clamp(max=n_in - 1), (pos - lo).to(x.dtype)

    y_lo, y_hi, dy = taps(x.shape[-2], h_out)
    x_lo, x_hi, dx = taps(x.shape[-1], w_out)
    left, right = x[..., x_lo], x[..., x_hi]
    rows = left + (right - left) * dx                     # interpolate along width first, as TF
    top, bottom = rows[..., y_lo, :], rows[..., y_hi, :]
    return top + (bottom - top) * dy[:, None]


def inception_preprocess(images: torch.Tensor, resize: str = "tf1") -> torch.Tensor:
    """Images (N, C, H, W) in [-1, 1], C = 1 (repeated to RGB) or 3 -> the network's (N, 3, 299, 299)
    input, by the TF graph's recipe (``"tf1"``) or pytorch-fid's (``"pytorch-fid"``); see the module doc."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, 1 or 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
    x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
    if resize == "tf1":
        u = (x + 1) * 127.5                                 # the [0, 255] scale the graph sees
        u = resize_bilinear_tf1(u, INPUT_SIZE)
        return (u - 128) / 128                              # the graph's Sub(128), Mul(1/128)
    if resize == "pytorch-fid":
        u = (x + 1) / 2                                     # [0, 1], pytorch-fid's input range
        u = F.interpolate(u, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * u - 1
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")


# ---- weights -------------------------------------------------------------------------------------
def _missing_weights_error(path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"FID Inception weights not found at {path}. difflab never downloads weights: download "
        f"{WEIGHTS_FILE} (pytorch-fid's port of TensorFlow's inception-2015-12-05 graph) from {WEIGHTS_URL} "
        "yourself and pass its path (--weights on the command line), or a .safetensors file written "
        "by difflab.eval.inception.convert_inception_weights."
    )


def remap_inception_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a foreign layout's keys to ours with :data:`PYTORCH_FID_BLOCKS_KEYS`; BatchNorm's
    ``num_batches_tracked`` counters (unused in eval) are dropped."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        for old, new in PYTORCH_FID_BLOCKS_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out


def load_inception_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read FID Inception weights from a ``.safetensors`` file or a ``.pth`` state dict
    (``torch.load(weights_only=True)``: no pickled code runs), keys renamed to ours."""
    path = Path(path)
    if not path.is_file():
        raise _missing_weights_error(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # a TorchScript archive or a pickled module, not a state dict
            raise ValueError(
                f"{path} is not a plain state dict that torch.load(weights_only=True) can read ({e}); "
                f"difflab needs pytorch-fid's {WEIGHTS_FILE} (a state dict), not a TorchScript or pickled model"
            ) from e
    if not isinstance(state, Mapping) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return remap_inception_keys(state)


def convert_inception_weights(pth: str | Path, out: str | Path) -> Path:
    """Write the tensors of a ``.pth`` FID Inception state dict to ``out`` (``.safetensors``), in
    our key layout, after checking that they load into :class:`FIDInceptionV3`."""
    from safetensors.torch import save_file

    state = load_inception_state_dict(pth)
    _load_into(FIDInceptionV3(), state, pth)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out),
              metadata={"format": "difflab-fid-inception", "source": Path(pth).name})
    return out


def _load_into(net: FIDInceptionV3, state: Mapping[str, torch.Tensor], source) -> bool:
    """Load ``state`` strictly (but for ``num_batches_tracked`` and an absent ``fc``); returns
    whether ``fc`` was present."""
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    has_fc = not any(k.startswith("fc.") for k in missing)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ValueError(
            f"{source} is not an FID Inception state dict: missing keys {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected keys {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    return has_fc


# ---- the feature extractor -----------------------------------------------------------------------
class InceptionFeatures(nn.Module):
    """FID/IS feature extractor: ``extractor(images)`` -> pool3 features (N, 2048) and
    ``extractor.logits(images)`` -> (N, 1008), for images (N, 1 or 3, H, W) in [-1, 1].

    ``weights``: a path to the FID Inception weights (``.pth`` state dict or ``.safetensors``), or
    a state dict. ``resize``: ``"tf1"`` (TTUR's and torch-fidelity's recipe, the default) or
    ``"pytorch-fid"``. The network runs in ``dtype`` on ``device``; features come back in that dtype.
    """

    def __init__(self, weights: str | Path | Mapping[str, torch.Tensor] | None, *, resize: str = "tf1",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__()
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if weights is None:
            raise _missing_weights_error(Path(WEIGHTS_FILE))
        self.resize = resize
        self.name = "inception-v3-fid" if resize == "tf1" else "inception-v3-fid-pytorch-fid-resize"
        self.preprocessing = (
            "grey -> RGB; [-1, 1] -> [0, 255]; TF1 resize_bilinear to 299x299; (x - 128) / 128" if resize == "tf1"
            else "grey -> RGB; [-1, 1] -> [0, 1]; F.interpolate bilinear (align_corners=False) to 299x299; 2x - 1"
        ) + f"; {str(dtype).removeprefix('torch.')}"
        state = remap_inception_keys(weights) if isinstance(weights, Mapping) else load_inception_state_dict(weights)
        self.net = FIDInceptionV3()
        self.has_logits = _load_into(self.net, state, "weights" if isinstance(weights, Mapping) else weights)
        self.net.to(device=device, dtype=dtype).eval().requires_grad_(False)

    def train(self, mode: bool = True):  # batch norm always uses the graph's running statistics
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the network's normalised (N, 3, 299, 299) input."""
        p = self.net.fc.weight
        return inception_preprocess(images.to(device=p.device, dtype=p.dtype), self.resize)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """pool3 features (N, 2048), FID's (Heusel et al. 2017)."""
        return self.net(self.preprocess(images))

    def logits_from_features(self, features: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """pool3 features -> the 1008 logits. ``bias=False`` is the Inception Score's convention:
        the original IS code (Salimans et al. 2016) multiplies pool3 by the softmax weights only,
        as torch-fidelity's and torchmetrics' ``logits_unbiased`` do."""
        if not self.has_logits:
            raise ValueError("these Inception weights have no fc layer, so no logits (features only)")
        out = features @ self.net.fc.weight.T
        return out + self.net.fc.bias if bias else out

    def logits(self, images: torch.Tensor, bias: bool = False) -> torch.Tensor:
        """Logits (N, 1008) for the Inception Score; see :meth:`logits_from_features`."""
        return self.logits_from_features(self(images), bias)

    def features_and_logits(self, images: torch.Tensor, bias: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Both in one pass through the network."""
        f = self(images)
        return f, self.logits_from_features(f, bias)


def load_inception(path: str | Path | None, *, device: str | torch.device = "cpu", resize: str = "tf1",
                   dtype: torch.dtype = torch.float32) -> InceptionFeatures:
    """The ``"inception"`` extractor of :data:`difflab.eval.features.EXTRACTORS`: FID Inception
    features from the weights file ``path``; ``FileNotFoundError`` naming the file when absent."""
    return InceptionFeatures(path, resize=resize, device=device, dtype=dtype)
