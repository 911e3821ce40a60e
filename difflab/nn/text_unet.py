"""A U-Net and a text encoder as one network: ``net(x_in, t, input_ids=)`` encodes the token ids
and cross-attends to them (Rombach et al. 2022, Section 3.3, eq. 3, with tau_theta trained
jointly with the U-Net), so one training run (:func:`difflab.train.train` with the ids as
per-example conditioning) trains both. The network of ``difflab demo --text``."""
from __future__ import annotations

from torch import nn

from .text import TinyTextEncoder
from .unet import UNet


class TextConditionedUNet(nn.Module):
    """``net(x_in, t, input_ids=)``: the text encoder's tokens of ``input_ids`` as the U-Net's
    cross-attention context. Token id 0 pads; a prompt with no token (the empty caption) gets no
    cross-attention, the unconditional model. ``context=`` / ``context_mask=`` given directly (as
    the pipelines do) bypass the encoder."""

    def __init__(self, unet: UNet, text_encoder: TinyTextEncoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder
        self.config = unet.config

    def forward(self, x, t, input_ids=None, context=None, context_mask=None):
        if input_ids is not None:
            context_mask = input_ids != 0
            context, _ = self.text_encoder(input_ids, context_mask)
        return self.unet(x, t, context=context, context_mask=context_mask)


__all__ = ["TextConditionedUNet"]
