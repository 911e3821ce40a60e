"""DreamBooth: fine-tune a text-to-image model on a few images of one subject (Ruiz et al. 2023,
"DreamBooth: Fine Tuning Text-to-Image Diffusion Models for Subject-Driven Generation", Section 3).

The subject's 3-5 images are paired with a prompt holding a rare identifier, ``"a sks digit"``
(Section 3.2); the model learns to bind the identifier to the subject. Fine-tuning on so few
images drifts the class noun toward the subject ("language drift") and narrows its output, so
the class-specific prior preservation loss (Section 3.3, eq. 2) keeps the model's own samples of
the class prompt, x_pr = x^(z_t1, c_pr) drawn from the *frozen* base model before fine-tuning:

    E[ w_t || x^(a_t x + s_t eps, c) - x ||^2 + lambda w_t' || x^(a_t' x_pr + s_t' eps', c_pr) - x_pr ||^2 ].

Each term is :func:`difflab.train.diffusion_loss` (in the network's own parameterization, one
value per example); :func:`prior_preservation_loss` runs both halves in one network call. The
objective (:class:`~difflab.train.objectives.dreambooth.SubjectObjective`) is trained by
:func:`difflab.train.fit`, the one training loop.

What trains: the whole U-Net, or only LoRA adapters (Hu et al. 2021; :mod:`difflab.adapters.lora`),
what most users run; the text encoder stays frozen, trains only the identifier's token
embeddings, or trains whole. A :class:`~difflab.nn.text.TinyTextEncoder` knows only the words of
its captions, so a new identifier is added to its vocabulary by :func:`add_tokens` (module
surgery: a larger embedding holding the old rows). Textual inversion (Gal et al. 2023) is the
same objective with only those rows trained: :mod:`difflab.train.textual_inversion`.

The model is a pixel- or latent-space denoiser ``D(x, sigma, context=, context_mask=)`` and a
text encoder, kept in one safetensors file (:mod:`difflab.io.text_model`, ``kind:
"difflab.text_model"``): the base model of ``difflab dreambooth`` and what it writes
(:func:`save_text_model` merges the LoRA adapters in).
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from difflab.adapters.lora import first_present, inject_lora, mark_only_lora_trainable, merge_lora, save_lora
from difflab.io.text_model import MODEL_FILE
from difflab.io.text_model import save_text_model as io_save_text_model
from difflab.nn.text import TinyTextEncoder, words
from difflab.pipelines.text_to_image import text_to_image

from .loop import TrainConfig, fit
from .losses import WEIGHTINGS
from .objectives.dreambooth import TEXT_MODES, RowsOnly, SubjectObjective, prior_preservation_loss, token_embedding

LORA_FILE = "lora.safetensors"
LORA_NAME = "dreambooth"
# Attention projections LoRA adapts by default, the first family a model has: the SD U-Net
# (diffusers' names, the targets of its DreamBooth-LoRA script), then difflab's ADM U-Net
# (SelfAttention.qkv/proj, CrossAttention.q/kv/proj).
ATTENTION_TARGETS = (("to_q", "to_k", "to_v", "to_out.0"), ("qkv", "q", "kv", "proj"))


# ----------------------------------------------------------------------------------------------
# New words in a TinyTextEncoder's vocabulary


def check_word(word: str) -> str:
    """A word the word-level tokenizer keeps as one token (lower-case letters and digits)."""
    if not isinstance(word, str) or words(word) != [word]:
        raise ValueError(f"identifier {word!r} must be one lower-case word of letters and digits (e.g. 'sks'): "
                         f"the tokenizer reads it as {words(word) if isinstance(word, str) else word!r}")
    return word


@torch.no_grad()
def add_tokens(text_encoder: TinyTextEncoder, new_words, *, init_word: str | None = None,
               generator: torch.Generator | None = None) -> list[int]:
    """Add ``new_words`` to a TinyTextEncoder's vocabulary; return the ids of all of them.

    Module surgery (the encoder's code is untouched): the token embedding is replaced by a larger
    one holding the old rows unchanged; ``config`` (its ``vocab``) and the word index follow, so
    :func:`~difflab.io.text.save_tiny_text` / ``load_tiny_text`` round-trip the grown encoder. Words already known keep
    their id and row. A new row is a copy of ``init_word``'s row (textual inversion's coarse
    descriptor, Gal et al. 2023, Section 4.1), or N(0, 1) drawn from ``generator`` (nn.Embedding's
    initialization) when ``init_word`` is None.
    """
    if not isinstance(text_encoder, TinyTextEncoder):
        raise TypeError(f"add_tokens grows a TinyTextEncoder's word vocabulary; got a {type(text_encoder).__name__} "
                        "(with a CLIP encoder, use a rare token it already has as the identifier)")
    new_words = [new_words] if isinstance(new_words, str) else list(new_words)
    for w in new_words:
        check_word(w)
    old = text_encoder.token_embedding
    if init_word is not None and init_word not in text_encoder.index:
        raise ValueError(f"init_word={init_word!r} is not in the encoder's vocabulary")
    added = [w for w in dict.fromkeys(new_words) if w not in text_encoder.index]
    if added:
        n_old = old.num_embeddings
        emb = nn.Embedding(n_old + len(added), old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        emb.weight[:n_old] = old.weight
        if init_word is None:
            rows = torch.randn(len(added), old.embedding_dim, generator=generator, dtype=torch.float32)
            emb.weight[n_old:] = rows.to(old.weight)
        else:
            emb.weight[n_old:] = old.weight[text_encoder.index[init_word]]
        emb.weight.requires_grad_(old.weight.requires_grad)
        text_encoder.token_embedding = emb
        text_encoder.config = dataclasses.replace(text_encoder.config, vocab=(*text_encoder.config.vocab, *added))
        text_encoder.index = {w: i for i, w in enumerate(text_encoder.config.vocab)}
    return [text_encoder.index[w] for w in new_words]


# ----------------------------------------------------------------------------------------------
# Class images from the frozen base model


@torch.no_grad()
def generate_class_images(denoiser, text_encoder, class_prompt: str, num_images: int, shape, *, guidance_scale: float = 2.0,
                          sampler: str = "ddim", steps: int = 50, seed: int = 0, batch_size: int = 64) -> torch.Tensor:
    """x_pr of Ruiz et al. 2023, Section 3.3: ``num_images`` samples (N, C, H, W) in [-1, 1] of
    ``class_prompt`` from the model as it is (call before fine-tuning), with classifier-free
    guidance against the empty prompt. ``shape`` is one sample's (C, H, W) (a pixel-space model)."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images} must be >= 1")
    was_training = denoiser.training, text_encoder.training
    denoiser.eval(), text_encoder.eval()
    try:
        return text_to_image(denoiser, text_encoder, None, [class_prompt] * num_images, guidance_scale=guidance_scale,
                             sampler=sampler, steps=steps, seed=seed, latent_shape=tuple(shape), batch_size=batch_size,
                             output_type="pt", progress=False)
    finally:
        denoiser.train(was_training[0]), text_encoder.train(was_training[1])


# ----------------------------------------------------------------------------------------------
# The fine-tuning loop


@dataclass(frozen=True)
class DreamBoothConfig:
    """DreamBooth's settings (the defaults suit the digits bench; SD users lower ``lr`` to ~5e-6 for a full fine-tune)."""

    identifier: str = "sks"                 # the rare identifier [V] (Section 3.2); added to a TinyTextEncoder's vocabulary
    class_prompt: str = "a digit"           # c_pr, the prompt of the class prior (Section 3.3)
    instance_prompt: str | None = None      # c; None = class_prompt with the identifier before its last word ("a sks digit")
    prior_weight: float = 1.0               # lambda of eq. 2; 0 = no prior preservation
    num_prior_images: int = 50              # class images sampled from the frozen model
    prior_guidance: float = 2.0             # their classifier-free guidance scale
    prior_sampler: str = "ddim"
    prior_steps: int = 50
    steps: int = 400
    batch_size: int = 4                     # instance examples per step (and as many class examples)
    lr: float = 2e-4                        # U-Net (or LoRA) learning rate, constant
    text_lr: float | None = None            # text encoder / token rows; None = lr
    lora_rank: int | None = None            # None = fine-tune the whole U-Net; r = LoRA adapters only
    lora_alpha: float | None = None         # None = rank (scale 1)
    lora_targets: tuple[str, ...] | None = None  # patterns (adapters.lora.matches); None = ATTENTION_TARGETS present
    text_encoder: str = "tokens"            # "frozen", "tokens" (the identifier's embedding rows) or "full"
    weighting: str = "simple"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        check_word(self.identifier)
        if self.text_encoder not in TEXT_MODES:
            raise ValueError(f"text_encoder={self.text_encoder!r} must be one of {list(TEXT_MODES)}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r} must be one of {list(WEIGHTINGS)}")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight={self.prior_weight} must be >= 0")
        if self.prior_weight > 0 and self.num_prior_images < 1:
            raise ValueError(f"num_prior_images={self.num_prior_images} must be >= 1 with prior preservation (prior_weight > 0)")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps={self.steps} and batch_size={self.batch_size} must be >= 1")
        if self.lora_rank is not None and not (isinstance(self.lora_rank, int) and self.lora_rank > 0):
            raise ValueError(f"lora_rank={self.lora_rank!r} must be a positive int or None (full fine-tune)")
        if self.lora_targets is not None:
            object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        if not self.class_prompt.strip():
            raise ValueError("class_prompt must not be empty")

    @property
    def prompt(self) -> str:
        """The instance prompt c: given, or the class prompt with the identifier before its last word."""
        if self.instance_prompt is not None:
            return self.instance_prompt
        head, _, last = self.class_prompt.strip().rpartition(" ")
        return " ".join(p for p in (head, self.identifier, last) if p)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass
class DreamBoothResult:
    """What :func:`dreambooth` did: the class images used, the identifier's token ids (in a
    TinyTextEncoder), the adapted modules (LoRA), trainable element counts and the loss log."""

    prior_images: torch.Tensor | None
    token_ids: list[int]
    lora_modules: list[str]
    trainable: dict[str, int]
    history: list[dict] = field(default_factory=list)


def default_lora_targets(net: nn.Module) -> list[str]:
    """The attention patterns of the first family of :data:`ATTENTION_TARGETS` that ``net`` has
    (those of its patterns that name at least one layer)."""
    return first_present(net, ATTENTION_TARGETS, "attention layers")


def fit_subject(denoiser, text_encoder, instance_images: torch.Tensor, instance_prompts: list[str], *, unet: str, text: str,
                token_ids=(), prior_images: torch.Tensor | None = None, prior_prompt: str | None = None,
                prior_weight: float = 0.0, steps: int, batch_size: int, lr: float, text_lr: float | None = None,
                weighting: str = "simple", max_grad_norm: float = 1.0, weight_decay: float = 0.0, seed: int = 0,
                log_every: int = 50, progress: bool = True, desc: str = "fine-tune") -> list[dict]:
    """What DreamBooth and textual inversion run: the :class:`SubjectObjective` trained by
    :func:`difflab.train.fit` in memory (no checkpoint, no EMA), AdamW at constant learning rates,
    gradients clipped at ``max_grad_norm``. Trainable parameters must already be marked:
    ``unet`` is ``"train"`` (the denoiser's parameters with requires_grad) or ``"frozen"``;
    ``text`` one of :data:`TEXT_MODES`. Each step takes ``batch_size`` instance examples (one
    permutation of them per epoch) and as many class examples; prompts, class examples, sigmas
    and noise are drawn from (``seed``, step); the net's own randomness (dropout) is seeded from
    ``seed``. Leaves both models in eval mode; returns the log (every ``log_every`` steps, at
    least one entry)."""
    if unet not in ("train", "frozen"):
        raise ValueError(f"unet={unet!r} must be 'train' or 'frozen'")
    objective = SubjectObjective(denoiser, text_encoder, instance_prompts, train_unet=unet == "train", text=text,
                                 token_ids=token_ids, prior_images=prior_images, prior_prompt=prior_prompt,
                                 prior_weight=prior_weight, weighting=weighting, text_lr=text_lr, name=desc)
    config = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                         grad_clip=max_grad_norm or None, ema_decay=None, log_every=min(log_every, steps), seed=seed,
                         progress=progress)
    try:
        state = fit(objective, {"x0": instance_images.to(objective.device)}, config)
    finally:
        objective.close()
    return state.history


def dreambooth(denoiser, text_encoder, instance_images: torch.Tensor, config: DreamBoothConfig = DreamBoothConfig(), *,
               prior_images: torch.Tensor | None = None, progress: bool = True) -> DreamBoothResult:
    """Fine-tune ``denoiser`` (and ``text_encoder``) in place on the subject's ``instance_images``
    (N, C, H, W) in the data's range, with class-specific prior preservation (Ruiz et al. 2023,
    Section 3.3, eq. 2).

    ``prior_images``: the class images x_pr; None samples ``config.num_prior_images`` of them from
    the model as given, before anything changes (:func:`generate_class_images`). With
    ``config.lora_rank`` only LoRA adapter ``"dreambooth"`` trains (inject into the attention
    projections, or ``config.lora_targets``); the U-Net's own weights are untouched (merge with
    :func:`difflab.adapters.merge_lora`, or save with :func:`save_dreambooth`).
    """
    c = config
    # 1. Check inputs.
    cfg = getattr(getattr(denoiser, "net", None), "config", None)
    in_channels = getattr(cfg, "in_channels", None)
    if instance_images.ndim != 4 or len(instance_images) == 0 or (in_channels and instance_images.shape[1] != in_channels):
        raise ValueError(f"instance_images must be a non-empty (N, {in_channels or 'C'}, H, W) tensor, got shape "
                         f"{tuple(instance_images.shape)}")
    if getattr(cfg, "context_dim", 0) is None:
        raise ValueError("the U-Net has no cross-attention (config.context_dim is None): DreamBooth needs a text-conditional model")
    if c.text_encoder == "tokens" and not isinstance(text_encoder, TinyTextEncoder):
        raise ValueError("text_encoder='tokens' trains the identifier's new row, which only a TinyTextEncoder gets; "
                         "use 'frozen' or 'full' with a CLIP encoder and a rare token it already has")

    # 2. Class images x_pr from the frozen base model (before the vocabulary or the weights change).
    use_prior = c.prior_weight > 0
    if use_prior and prior_images is None:
        prior_images = generate_class_images(denoiser, text_encoder, c.class_prompt, c.num_prior_images,
                                             tuple(instance_images.shape[1:]), guidance_scale=c.prior_guidance,
                                             sampler=c.prior_sampler, steps=c.prior_steps, seed=c.seed)
    if use_prior and prior_images.shape[1:] != instance_images.shape[1:]:
        raise ValueError(f"prior_images {tuple(prior_images.shape)} and instance_images {tuple(instance_images.shape)} differ in shape")

    # 3. The identifier into the vocabulary (a TinyTextEncoder knows only its captions' words).
    token_ids = []
    if isinstance(text_encoder, TinyTextEncoder):
        token_ids = add_tokens(text_encoder, [c.identifier], generator=torch.Generator().manual_seed(c.seed))

    # 4. What trains: the U-Net or its LoRA adapters; none, some rows or all of the text encoder.
    for p in text_encoder.parameters():
        p.requires_grad_(c.text_encoder == "full")
    net = denoiser.net
    lora_modules = []
    if c.lora_rank is None:
        for p in net.parameters():
            p.requires_grad_(True)
        unet_trainable = sum(p.numel() for p in net.parameters())
    else:
        targets = list(c.lora_targets) if c.lora_targets else default_lora_targets(net)
        lora_modules = inject_lora(net, targets, c.lora_rank, c.lora_alpha, name=LORA_NAME,
                                   generator=torch.Generator().manual_seed(c.seed))
        unet_trainable = mark_only_lora_trainable(net, LORA_NAME)
    text_trainable = {"frozen": 0, "tokens": len(token_ids) * token_embedding(text_encoder).embedding_dim,
                      "full": sum(p.numel() for p in text_encoder.parameters())}[c.text_encoder]

    # 5. The loop.
    history = fit_subject(denoiser, text_encoder, instance_images, [c.prompt], unet="train", text=c.text_encoder,
                          token_ids=token_ids, prior_images=prior_images if use_prior else None, prior_prompt=c.class_prompt,
                          prior_weight=c.prior_weight, steps=c.steps, batch_size=c.batch_size, lr=c.lr, text_lr=c.text_lr,
                          weighting=c.weighting, max_grad_norm=c.max_grad_norm, weight_decay=c.weight_decay, seed=c.seed,
                          log_every=c.log_every, progress=progress, desc="dreambooth")
    for p in list(net.parameters()) + list(text_encoder.parameters()):
        p.requires_grad_(False)
    return DreamBoothResult(prior_images if use_prior else None, token_ids, lora_modules,
                            {"unet": unet_trainable, "text_encoder": text_trainable}, history)


# ----------------------------------------------------------------------------------------------
# Checkpoints: a pixel-space U-Net and its TinyTextEncoder together


def _plain_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The net's state with every LoRA adapter merged in and no LoRA tensors, from a merged copy
    (the net itself is untouched)."""
    merged = copy.deepcopy(net)
    merge_lora(merged)
    return {k: v.detach() for k, v in merged.state_dict().items() if ".lora_A." not in k and ".lora_B." not in k}


def save_text_model(path, denoiser, text_encoder: TinyTextEncoder, spec: dict, metadata: dict | None = None) -> Path:
    """:func:`difflab.io.text_model.save_text_model` with every LoRA adapter of the network merged in
    (the file loads as a base model again). ``path``: a ``.safetensors`` file or a folder."""
    return io_save_text_model(path, denoiser, text_encoder, spec, metadata, state=_plain_state(denoiser.net))


def save_dreambooth(out_dir, denoiser, text_encoder: TinyTextEncoder, spec: dict, config: DreamBoothConfig,
                    result: DreamBoothResult, metadata: dict | None = None) -> dict[str, Path]:
    """Write a DreamBooth run to ``out_dir``: ``model.safetensors`` (:func:`save_text_model`, LoRA
    merged: it loads as a base model again) and, for a LoRA run, ``lora.safetensors``
    (:func:`difflab.adapters.save_lora`, adapter ``"dreambooth"`` alone; it needs the
    fine-tuned text encoder of ``model.safetensors`` for the identifier). Every file is atomic."""
    out_dir = Path(out_dir)
    meta = {**(metadata or {}), "dreambooth": {**config.to_dict(), "instance_prompt": config.prompt,
                                               "token_ids": result.token_ids, "trainable": result.trainable,
                                               "history": result.history}}
    files = {"model": save_text_model(out_dir / MODEL_FILE, denoiser, text_encoder, spec, meta)}
    if result.lora_modules:
        files["lora"] = save_lora(out_dir / LORA_FILE, denoiser.net, LORA_NAME)
    return files


__all__ = ["DreamBoothConfig", "DreamBoothResult", "dreambooth", "fit_subject", "prior_preservation_loss",
           "generate_class_images", "add_tokens", "check_word", "token_embedding", "RowsOnly", "default_lora_targets",
           "save_text_model", "save_dreambooth", "ATTENTION_TARGETS", "TEXT_MODES"]
