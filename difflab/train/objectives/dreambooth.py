"""The subject objective of DreamBooth (Ruiz et al. 2023, Section 3.3, eq. 2) and textual
inversion (Gal et al. 2023, eq. 2): the denoising loss of the subject's images under their
prompts, plus lambda times the loss of the frozen model's class images x_pr under the class
prompt (prior preservation),

    E[ w_t || x^(a_t x + s_t eps, c) - x ||^2 + lambda w_t' || x^(a_t' x_pr + s_t' eps', c_pr) - x_pr ||^2 ],

each term :func:`difflab.train.diffusion_loss` (in the network's own parameterization).

A batch row is one instance example and (with prior preservation) one class example, so its
per-example loss is instance_i + lambda prior_i and the batch mean is eq. 2. What trains is the
U-Net (or its LoRA adapters) and/or the text encoder, whole or only some token rows
(:class:`RowsOnly`); the frozen ones sit outside ``module``, in eval mode.
"""
from __future__ import annotations

import torch
from torch import nn

from difflab.nn.text import TinyTextEncoder

from ..losses import diffusion_loss, draw_sigmas

TEXT_MODES = ("frozen", "tokens", "full")  # what of the text encoder trains


def token_embedding(text_encoder) -> nn.Embedding:
    """The token-embedding table of a TinyTextEncoder or a CLIPTextEncoder."""
    if isinstance(text_encoder, TinyTextEncoder):
        return text_encoder.token_embedding
    if hasattr(text_encoder, "embeddings") and "token_embedding" in text_encoder.embeddings:
        return text_encoder.embeddings["token_embedding"]
    raise TypeError(f"cannot find the token embedding of a {type(text_encoder).__name__}")


class RowsOnly:
    """Train only some rows of an embedding table: gradients of the other rows are zeroed (so
    Adam's moments of those rows stay 0) and, after every optimizer step, :meth:`restore` puts
    their original values back (so weight decay cannot move them either), as diffusers'
    textual-inversion script does."""

    def __init__(self, embedding: nn.Embedding, rows):
        self.embedding = embedding
        self.train_rows = torch.zeros(embedding.num_embeddings, dtype=torch.bool, device=embedding.weight.device)
        self.train_rows[torch.as_tensor(list(rows), dtype=torch.long)] = True
        self.original = embedding.weight.detach().clone()
        embedding.weight.requires_grad_(True)
        mask = self.train_rows[:, None].to(embedding.weight.dtype)
        self.handle = embedding.weight.register_hook(lambda g: g * mask)

    @torch.no_grad()
    def restore(self) -> None:
        w = self.embedding.weight
        w[~self.train_rows] = self.original[~self.train_rows]

    def remove(self) -> None:
        self.handle.remove()


def encode_prompts(text_encoder, prompts: list[str], device) -> dict:
    """The U-Net's cross-attention keywords ``context`` (and ``context_mask``) of ``prompts``."""
    hidden, _, mask = text_encoder.encode(prompts, return_mask=True)
    cond = {"context": hidden.to(device)}
    if mask is not None:
        cond["context_mask"] = mask.to(device)
    return cond


def prior_preservation_loss(denoiser, x_instance: torch.Tensor, x_prior: torch.Tensor | None, sigma, noise: torch.Tensor,
                            *, instance_cond: dict, prior_cond: dict | None = None, prior_weight: float = 1.0,
                            weighting: str = "simple", min_snr_gamma: float = 5.0) -> dict:
    """Ruiz et al. 2023, eq. 2: the instance loss plus lambda times the class-prior loss.

    ``x_instance`` (n, ...) are the subject's images, conditioned by ``instance_cond`` (the
    network's keywords, e.g. ``context=`` / ``context_mask=`` of "a sks digit"); ``x_prior``
    (m, ...) the frozen base model's samples of the class prompt, conditioned by ``prior_cond``
    (the same keys). ``sigma`` (n + m,) and ``noise`` (n + m, ...) noise instance examples first.
    Both halves run in one network call. Returns ``{"loss": mean(instance) + prior_weight *
    mean(prior), "instance": (n,), "prior": (m,)}``, the per-example terms being
    :func:`difflab.train.diffusion_loss`. ``x_prior=None`` (or m = 0) is plain fine-tuning.
    """
    n = len(x_instance)
    if x_prior is None or len(x_prior) == 0:
        x0, cond = x_instance, dict(instance_cond)
    else:
        if prior_cond is None or set(prior_cond) != set(instance_cond):
            raise ValueError(f"prior_cond must have the keys of instance_cond {sorted(instance_cond)}, got "
                             f"{None if prior_cond is None else sorted(prior_cond)}")
        x0 = torch.cat([x_instance, x_prior])
        cond = {k: torch.cat([instance_cond[k], prior_cond[k]]) for k in instance_cond}
    if noise.shape != x0.shape:
        raise ValueError(f"noise must have the shape of the instance and prior images together {tuple(x0.shape)}, "
                         f"got {tuple(noise.shape)}")
    losses = diffusion_loss(denoiser, x0, sigma, noise, weighting=weighting, min_snr_gamma=min_snr_gamma, extra_args=cond)
    instance, prior = losses[:n], losses[n:]
    total = instance.mean() + (prior_weight * prior.mean() if len(prior) else 0.0)
    return {"loss": total, "instance": instance, "prior": prior}


class SubjectObjective:
    """Eq. 2 over batches of the subject's images ``x0``: each example's prompt is drawn among
    ``prompts``, its class example among ``prior_images`` (when ``prior_weight`` > 0), the sigmas
    from the frame's training distribution and the noise, all in ``draw``.

    ``train_unet``: the denoiser's parameters with requires_grad train (whole U-Net or LoRA);
    ``text``: one of :data:`TEXT_MODES` (``"tokens"``: only the rows ``token_ids`` of the token
    embedding, restored after every step). ``text_lr`` is the text encoder's rate (None: the
    config's). Call :meth:`close` after training (it removes the row mask's hook)."""

    def __init__(self, denoiser, text_encoder, prompts: list[str], *, train_unet: bool, text: str, token_ids=(),
                 prior_images: torch.Tensor | None = None, prior_prompt: str | None = None, prior_weight: float = 0.0,
                 weighting: str = "simple", text_lr: float | None = None, name: str = "fine-tune"):
        if text not in TEXT_MODES:
            raise ValueError(f"text={text!r} must be one of {list(TEXT_MODES)}")
        if not train_unet and text == "frozen":
            raise ValueError("nothing to train: the U-Net and the text encoder are both frozen")
        if text == "tokens" and not len(token_ids):
            raise ValueError("text='tokens' needs the token_ids whose embedding rows train")
        if train_unet and not any(p.requires_grad for p in denoiser.parameters()):
            raise ValueError("no trainable U-Net parameter: mark them (full fine-tune or LoRA) before training")
        self.denoiser, self.text_encoder, self.prompts, self.name = denoiser, text_encoder, list(prompts), name
        self.text, self.text_lr, self.weighting = text, text_lr, weighting
        self.device = next(denoiser.parameters()).device
        self.use_prior = prior_images is not None and prior_weight > 0
        self.prior_images = prior_images.to(self.device) if self.use_prior else None
        self.prior_prompt, self.prior_weight = prior_prompt, prior_weight
        self.rows = RowsOnly(token_embedding(text_encoder), token_ids) if text == "tokens" else None
        trained = {"unet": denoiser.net} if train_unet else {}
        if text != "frozen":
            trained["text_encoder"] = text_encoder
        self.module = nn.ModuleDict(trained)
        denoiser.train(train_unet)  # the frozen parts stay in eval mode (no dropout)
        text_encoder.train(text != "frozen")
        self.cached = None
        if text == "frozen":  # the prompts' encodings do not change: encode them once
            with torch.no_grad():
                self.cached = {p: encode_prompts(text_encoder, [p], self.device)
                               for p in self.prompts + ([prior_prompt] if self.use_prior else [])}

    def param_groups(self, config) -> list[dict]:
        groups = []
        if "unet" in self.module:
            groups.append({"params": [p for p in self.denoiser.net.parameters() if p.requires_grad], "lr": config.lr})
        if self.text != "frozen":
            params = [self.rows.embedding.weight] if self.rows is not None else list(self.text_encoder.parameters())
            groups.append({"params": params, "lr": config.lr if self.text_lr is None else self.text_lr})
        return groups

    def draw(self, batch: dict, generator: torch.Generator) -> dict:
        x0 = batch["x0"]
        B = len(x0)
        out = {"prompt": torch.randint(0, len(self.prompts), (B,), generator=generator)}
        m = B if self.use_prior else 0
        if self.use_prior:
            out["prior_index"] = torch.randint(0, len(self.prior_images), (m,), generator=generator)
        sigma = draw_sigmas(self.denoiser.frame, B + m, generator).float()
        noise = torch.randn((B + m, *x0.shape[1:]), generator=generator)
        out.update(instance_sigma=sigma[:B], instance_noise=noise[:B])
        if self.use_prior:
            out.update(prior_sigma=sigma[B:], prior_noise=noise[B:])
        return out

    def _cond(self, prompts: list[str]) -> dict:
        if self.cached is not None:
            return {k: torch.cat([self.cached[p][k] for p in prompts]) for k in self.cached[prompts[0]]}
        return encode_prompts(self.text_encoder, prompts, self.device)

    def loss(self, batch: dict) -> dict:
        prompts = [self.prompts[int(i)] for i in batch["prompt"]]
        sigma, noise, x_prior, prior_cond = batch["instance_sigma"], batch["instance_noise"], None, None
        if self.use_prior:
            x_prior = self.prior_images[batch["prior_index"]]
            prior_cond = self._cond([self.prior_prompt] * len(x_prior))
            sigma, noise = torch.cat([sigma, batch["prior_sigma"]]), torch.cat([noise, batch["prior_noise"]])
        out = prior_preservation_loss(self.denoiser, batch["x0"], x_prior, sigma, noise, instance_cond=self._cond(prompts),
                                      prior_cond=prior_cond, prior_weight=self.prior_weight, weighting=self.weighting)
        if not self.use_prior:
            return {"loss": out["instance"], "instance": out["instance"]}
        return {"loss": out["instance"] + self.prior_weight * out["prior"], "instance": out["instance"], "prior": out["prior"]}

    def after_step(self) -> None:
        if self.rows is not None:
            self.rows.restore()

    def close(self) -> None:
        if self.rows is not None:
            self.rows.remove()
        self.denoiser.eval(), self.text_encoder.eval()


__all__ = ["SubjectObjective", "prior_preservation_loss", "RowsOnly", "token_embedding", "encode_prompts", "TEXT_MODES"]
