"""Textual inversion (Gal et al. 2023, "An Image is Worth One Word: Personalizing Text-to-Image
Generation using Textual Inversion", Section 4.1, eq. 2): a new word S* whose embedding v is the
only thing learned,

    v* = argmin_v E[ || eps - eps_theta(z_t, t, c_theta(y)) ||^2 ],

with y a template holding S* ("a picture of a S*") and the text encoder c_theta and the
denoiser frozen. In difflab's loss the squared error is taken in the network's own
parameterization (:func:`difflab.train.diffusion_loss`). S* joins a TinyTextEncoder's vocabulary
(:func:`difflab.train.dreambooth.add_tokens`), starting from a coarse descriptor's row; the loop
is DreamBooth's objective (:func:`difflab.train.dreambooth.fit_subject`, run by
:func:`difflab.train.fit`) with only that row trained.
The learned rows are saved as ``{word: vector}``, the layout of diffusers' ``learned_embeds``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from difflab.io.checkpoint import load_checkpoint, save_checkpoint
from difflab.nn.text import TinyTextEncoder

from .dreambooth import add_tokens, check_word, fit_subject
from .losses import WEIGHTINGS

EMBEDS_KIND = "difflab.textual_inversion"
EMBEDS_FILE = "learned_embeds.safetensors"


@dataclass(frozen=True)
class TextualInversionConfig:
    """Textual inversion's settings: the placeholder word S*, its starting row, the prompt templates."""

    placeholder: str = "sks"                # S*: one new lower-case word
    init_word: str | None = None            # the coarse descriptor whose row v starts from; None = N(0, 1)
    templates: tuple[str, ...] = ("a {}", "the {}", "a picture of a {}")  # "{}" is replaced by S*
    steps: int = 500
    batch_size: int = 4
    lr: float = 5e-3
    weighting: str = "simple"
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        check_word(self.placeholder)
        object.__setattr__(self, "templates", tuple(self.templates))
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError(f"templates must be a non-empty list of prompts holding '{{}}', got {list(self.templates)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} must be one of {list(WEIGHTINGS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")

    @property
    def prompts(self) -> list[str]:
        return [t.format(self.placeholder) for t in self.templates]


def textual_inversion(denoiser, text_encoder: TinyTextEncoder, images: torch.Tensor,
                      config: TextualInversionConfig = TextualInversionConfig(), *, progress: bool = True) -> dict:
    """Learn the embedding of ``config.placeholder`` from ``images`` (N, C, H, W) (Gal et al. 2023,
    eq. 2). The placeholder is added to ``text_encoder``'s vocabulary; nothing else changes.
    Returns ``{"token_id": id, "history": [...]}``."""
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"images must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
    if config.placeholder in getattr(text_encoder, "index", {}):
        raise ValueError(f"placeholder {config.placeholder!r} is already a word of the vocabulary: choose a new one")
    (token_id,) = add_tokens(text_encoder, [config.placeholder], init_word=config.init_word,
                             generator=torch.Generator().manual_seed(config.seed))
    for p in list(denoiser.parameters()) + list(text_encoder.parameters()):
        p.requires_grad_(False)
    history = fit_subject(denoiser, text_encoder, images, config.prompts, unet="frozen", text="tokens", token_ids=[token_id],
                          steps=config.steps, batch_size=config.batch_size, lr=config.lr, weighting=config.weighting,
                          max_grad_norm=config.max_grad_norm, seed=config.seed, log_every=config.log_every,
                          progress=progress, desc="textual inversion")
    text_encoder.token_embedding.weight.requires_grad_(False)
    return {"token_id": token_id, "history": history}


def save_learned_embeds(path, text_encoder: TinyTextEncoder, learned_words, metadata: dict | None = None) -> Path:
    """Write the rows of ``learned_words`` as ``{word: vector (D,)}`` atomically (a ``.safetensors``
    file, or a directory that gets ``learned_embeds.safetensors``)."""
    learned_words = [learned_words] if isinstance(learned_words, str) else list(learned_words)
    missing = [w for w in learned_words if w not in text_encoder.index]
    if missing:
        raise ValueError(f"words {missing} are not in the encoder's vocabulary")
    weight = text_encoder.token_embedding.weight
    tensors = {w: weight[text_encoder.index[w]].detach().clone() for w in learned_words}
    path = Path(path)
    return save_checkpoint(path if path.suffix == ".safetensors" else path / EMBEDS_FILE, tensors,
                           {**(metadata or {}), "kind": EMBEDS_KIND, "words": learned_words, "width": int(weight.shape[1])})


@torch.no_grad()
def load_learned_embeds(path, text_encoder: TinyTextEncoder) -> list[int]:
    """Add the words of a :func:`save_learned_embeds` file to ``text_encoder`` with their rows; returns their ids."""
    path = Path(path)
    tensors, meta = load_checkpoint(path if path.suffix == ".safetensors" else path / EMBEDS_FILE)
    if meta.get("kind") != EMBEDS_KIND:
        raise ValueError(f"{path} is not a textual-inversion file (kind={meta.get('kind')!r})")
    width = text_encoder.token_embedding.embedding_dim
    if meta["width"] != width:
        raise ValueError(f"{path} holds {meta['width']}-wide embeddings; the text encoder's width is {width}")
    ids = add_tokens(text_encoder, meta["words"])
    for w, i in zip(meta["words"], ids):
        text_encoder.token_embedding.weight[i] = tensors[w].to(text_encoder.token_embedding.weight)
    return ids


__all__ = ["TextualInversionConfig", "textual_inversion", "save_learned_embeds", "load_learned_embeds"]
