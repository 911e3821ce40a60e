"""The scenes judge: a small CNN that reads a rendered scene (:mod:`difflab.data.scenes`) and says
how many objects it holds and which palette colours are present (the scenes' objects have
distinct colours, so the colours name the objects). It judges generated scenes: the count asked
of a count-conditional model, one object fewer after a slot is removed, the colour of a slot
swapped in from another scene."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.scenes import COLOURS


class SceneJudge(nn.Module):
    """conv(3->w)-conv(w->w)-pool-conv(w->2w)-conv(2w->2w)-global average and max pool, then two
    heads: count logits (``max_objects``: 1..max) and colour-presence logits (one per colour)."""

    def __init__(self, max_objects: int = 4, width: int = 32, seed: int = 0):
        super().__init__()
        w = width
        self.max_objects = max_objects
        with torch.random.fork_rng():  # seeded layers; the caller's global generator is left as it was
            torch.manual_seed(seed)
            self.build(w, max_objects)

    def build(self, w: int, max_objects: int) -> None:
        self.body = nn.Sequential(nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(),
                                  nn.MaxPool2d(2), nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU())
        self.count_head = nn.Linear(4 * w, max_objects)
        self.colour_head = nn.Linear(4 * w, len(COLOURS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(count logits (N, max_objects), colour logits (N, colours)) of images (N, 3, H, W) in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"the scenes judge takes (N, 3, H, W) images in [-1, 1], got shape {tuple(images.shape)}")
        h = self.body(images.float().clamp(-1, 1))
        h = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        return self.count_head(h), self.colour_head(h)

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(counts (N,) in 1..max_objects, colour presence (N, colours) bool)."""
        counts, colours = [], []
        for i in range(0, len(images), batch_size):
            c, p = self(images[i:i + batch_size])
            counts.append(c.argmax(1) + 1)
            colours.append(p > 0)
        return torch.cat(counts), torch.cat(colours)


def colour_presence(colours: torch.Tensor) -> torch.Tensor:
    """(N, colours) bool from the scenes' (N, max_objects) colour indices (-1 = no object)."""
    present = torch.zeros(len(colours), len(COLOURS) + 1, dtype=torch.bool)
    present[torch.arange(len(colours))[:, None], colours.clamp(min=-1) % (len(COLOURS) + 1)] = True
    return present[:, :len(COLOURS)]


def train_scene_judge(images: torch.Tensor, counts: torch.Tensor, colours: torch.Tensor, *, max_objects: int = 4,
                      steps: int = 600, batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> SceneJudge:
    """Train a :class:`SceneJudge` on real scenes (images, counts 1..max, colour indices (N, max)
    with -1 padding) with Adam: cross-entropy on the count plus binary cross-entropy on each
    colour's presence. Random horizontal flips (a mirrored scene has the same objects)."""
    judge = SceneJudge(max_objects, seed=seed)
    present = colour_presence(colours).float()
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(judge.parameters(), lr)
    judge.train()
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=generator)
        x = images[idx]
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        count_logits, colour_logits = judge(x)
        loss = F.cross_entropy(count_logits, counts[idx] - 1) + F.binary_cross_entropy_with_logits(colour_logits, present[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return judge.eval()





def judge_accuracy(judge: SceneJudge, images: torch.Tensor, counts: torch.Tensor, colours: torch.Tensor) -> dict:
    """The judge's accuracy on scenes: ``count`` (the count read right) and ``colours`` (the
    whole set of colours read right)."""
    read_counts, read_colours = judge.read(images)
    return {"count": float((read_counts == counts).float().mean()),
            "colours": float((read_colours == colour_presence(colours)).all(1).float().mean())}

__all__ = ["SceneJudge", "train_scene_judge", "colour_presence", "judge_accuracy"]
