"""Key maps of AnimateDiff motion modules (Guo et al. 2023), as data.

diffusers keeps each motion module inside the U-Net block it follows
(``down_blocks.{i}.motion_modules.{k}``, ``mid_block.motion_modules.{k}``,
``up_blocks.{j}.motion_modules.{k}``; the same names in a ``MotionAdapter`` folder, which holds
only those); difflab's :class:`~difflab.nn.motion.MotionUNet` keeps them beside the image
network, one per temporal site (``motion.down_{i}_{k}``, ``motion.mid_{k}``, ``motion.up_{j}_{k}``),
and the image network under ``unet.``. Inside a motion module the names are the same
(diffusers' ``AnimateDiffTransformer3D``); the image network's are those of
``UNet2DConditionModel`` (:data:`difflab.io.keymaps.unet_sd.DIFFUSERS` is empty).
"""
from __future__ import annotations

# (diffusers UNetMotionModel / MotionAdapter, difflab MotionUNet); the last row takes every other key
DIFFUSERS = [
    ("down_blocks.{i}.motion_modules.{k}.", "motion.down_{i}_{k}."),
    ("mid_block.motion_modules.{k}.", "motion.mid_{k}."),
    ("up_blocks.{j}.motion_modules.{k}.", "motion.up_{j}_{k}."),
    ("", "unet."),
]

# a MotionAdapter folder holds only the motion modules: the same rows without the image network's
ADAPTER = DIFFUSERS[:3]

__all__ = ["DIFFUSERS", "ADAPTER"]
