"""A density-and-colour voxel grid and its differentiable volume renderer: the 3-D representation
that score distillation optimizes (:mod:`difflab.pipelines.score_distillation`).

World frame: x right, y up, z towards the front camera; the grid fills the cube [-1, 1]^3.

- :class:`VoxelGrid`: an R^3 grid of raw densities and raw grey colours; density = softplus(raw)
  * ``density_scale``, colour = sigmoid(raw) in [0, 1]. Voxel i's centre is at (i + 0.5) / R * 2 - 1;
  read between centres by trilinear interpolation (``grid_sample``, the border value up to the
  cube's faces), and zero outside the cube.
- :func:`orbit_rays`: one ray per pixel of cameras on a sphere around the origin, at yaw (about
  y; 0 = looking from +z, 90 = from +x) and elevation (degrees), orthographic (parallel rays through
  a square of half-width ``extent``) or perspective (rays from a pinhole at ``distance`` with
  field of view ``fov``).
- :func:`render`: emission-absorption volume rendering by alpha compositing (Max 1995; the
  quadrature of NeRF, Mildenhall et al. 2020, eq. 3): along each ray K evenly spaced samples,
  alpha_k = 1 - exp(-sigma_k delta), transmittance T_k = prod_{j<k} (1 - alpha_j), intensity
  sum_k T_k alpha_k c_k over a black background, and the opacity sum_k T_k alpha_k. Everything
  is differentiable in the grid (and in the rays).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VoxelGrid(nn.Module):
    """``resolution``^3 raw densities (initialized to ``init_density`` after the softplus) and raw
    colours (initialized to ``colour_init``, sigmoid(2) = 0.88: near white); ``forward()`` -> (density, colour),
    each (1, 1, R, R, R) with the grid's z, y, x as depth, height, width."""

    def __init__(self, resolution: int = 16, density_scale: float = 10.0, init_density: float = 0.05,
                 colour: bool = True, colour_init: float = 2.0):
        super().__init__()
        if not (isinstance(resolution, int) and resolution >= 2):
            raise ValueError(f"resolution={resolution!r} must be an integer >= 2")
        if not density_scale > 0 or not init_density > 0:
            raise ValueError(f"density_scale={density_scale} and init_density={init_density} must be > 0")
        self.density_scale = float(density_scale)
        raw = math.log(math.expm1(init_density / density_scale))       # softplus^-1
        self.raw_density = nn.Parameter(torch.full((1, 1, resolution, resolution, resolution), raw))
        self.raw_colour = nn.Parameter(torch.full((1, 1, resolution, resolution, resolution), float(colour_init)),
                                       requires_grad=colour)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return F.softplus(self.raw_density) * self.density_scale, torch.sigmoid(self.raw_colour)


def camera_frame(yaw: torch.Tensor, elevation: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c, right, up), each (B, 3): the unit vector from the origin to the camera at ``yaw`` and
    ``elevation`` (degrees, (B,)), and the image's right and up directions."""
    th, ph = torch.deg2rad(yaw.double()), torch.deg2rad(elevation.double())
    c = torch.stack([th.sin() * ph.cos(), ph.sin(), th.cos() * ph.cos()], -1)
    right = torch.stack([th.cos(), torch.zeros_like(th), -th.sin()], -1)
    up = torch.linalg.cross(c, right)
    return c, right, up


def orbit_rays(yaw, elevation, size: int, *, extent: float = 1.0, perspective: bool = False, distance: float = 3.0,
               fov: float = 40.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(origins, directions), each (B, size, size, 3), of the pixel centres' rays (row 0 at the top).
    Orthographic: origins on the plane at ``distance`` from the origin, spanning [-extent, extent]^2,
    parallel directions; perspective: one origin at ``distance``, directions through a ``fov``-degree square."""
    if not (isinstance(size, int) and size >= 1):
        raise ValueError(f"size={size!r} must be an integer >= 1")
    yaw, elevation = torch.as_tensor(yaw, dtype=torch.float64).reshape(-1), torch.as_tensor(elevation, dtype=torch.float64).reshape(-1)
    if yaw.shape != elevation.shape:
        raise ValueError(f"yaw and elevation must hold one angle per camera, got {tuple(yaw.shape)} and {tuple(elevation.shape)}")
    c, right, up = camera_frame(yaw, elevation)
    s = (torch.arange(size, dtype=torch.float64) + 0.5) / size * 2 - 1               # pixel centres in (-1, 1)
    px, py = s[None, :].expand(size, size), -s[:, None].expand(size, size)           # row 0 is the top
    plane = px[None, ..., None] * right[:, None, None] + py[None, ..., None] * up[:, None, None]
    if perspective:
        half = math.tan(math.radians(fov) / 2)
        d = -c[:, None, None] + half * plane
        origins = (distance * c)[:, None, None].expand_as(d)
    else:
        origins = distance * c[:, None, None] + extent * plane
        d = (-c)[:, None, None].expand_as(origins)
    return origins.to(dtype), F.normalize(d, dim=-1).to(dtype)


def render(density: torch.Tensor, colour: torch.Tensor, origins: torch.Tensor, directions: torch.Tensor, *,
           near: float = 1.0, far: float = 5.0, samples: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Alpha-composite the grid along the rays: (intensity, opacity), each (B, 1, H, W) in [0, 1].
    ``density`` and ``colour`` (1, 1, D, H, W) cover [-1, 1]^3; ``samples`` evenly spaced points
    per ray between distances ``near`` and ``far`` (the midpoints of equal segments)."""
    if density.ndim != 5 or colour.shape != density.shape:
        raise ValueError(f"density and colour must be (1, 1, D, H, W) grids, got {tuple(density.shape)}, {tuple(colour.shape)}")
    b, h, w, _ = origins.shape
    delta = (far - near) / samples
    t = near + delta * (torch.arange(samples, dtype=origins.dtype, device=origins.device) + 0.5)
    pts = origins[..., None, :] + t[:, None] * directions[..., None, :]               # (B, H, W, K, 3)
    grid = pts.reshape(1, b * h * w, samples, 1, 3)                                   # grid_sample's (x, y, z) order
    both = torch.cat([density, colour], 1)
    vals = F.grid_sample(both.to(pts.dtype), grid, mode="bilinear", padding_mode="border", align_corners=False)
    inside = (pts.abs() <= 1).all(-1).to(pts.dtype)                                 # nothing outside the cube
    sigma, c = vals[0, 0, ..., 0].reshape(b, h, w, samples) * inside, vals[0, 1, ..., 0].reshape(b, h, w, samples)
    tau = sigma * delta
    alpha = 1 - torch.exp(-tau)
    trans = torch.exp(-(torch.cumsum(tau, -1) - tau))                                 # exclusive: prod_{j<k} (1 - alpha_j)
    weights = trans * alpha
    intensity, opacity = (weights * c).sum(-1), weights.sum(-1)
    return intensity[:, None], opacity[:, None]


def render_views(grid: VoxelGrid, yaw, elevation, size: int = 8, *, supersample: int = 2, perspective: bool = False,
                 samples: int = 48) -> torch.Tensor:
    """Grey views (B, 1, size, size) in [-1, 1] (black -1 background, white +1 where opaque and
    bright): rendered at ``size * supersample`` and area-averaged down, as a camera's pixels would."""
    density, colour = grid()
    o, d = orbit_rays(yaw, elevation, size * supersample, perspective=perspective, dtype=density.dtype)
    intensity, _ = render(density, colour, o.to(density.device), d.to(density.device), samples=samples)
    if supersample > 1:
        intensity = F.avg_pool2d(intensity, supersample)
    return intensity * 2 - 1


__all__ = ["VoxelGrid", "camera_frame", "orbit_rays", "render", "render_views"]
