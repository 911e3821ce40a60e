"""Pipelines: short functions with numbered stages that turn a request into images. The stages
they share are in :mod:`.common`, the sampling options in :mod:`.options`."""
from .cascade import cascade
from .checkpoint import sample_checkpoint
from .class_to_image import generate
from .edit import Inversion, edit, invert, null_text_optimization, reconstruct
from .folder import sample_folder
from .image_to_image import image_to_image
from .inpaint import inpaint
from .options import SampleOptions
from .outpaint import outpaint
from .super_resolution import super_resolve
from .sd3 import sd3_image_to_image, sd3_text_to_image
from .sdxl import MicroConditioning, sdxl_image_to_image, sdxl_inpaint, sdxl_text_to_image
from .text_to_image import text_to_image

__all__ = ["generate", "text_to_image", "image_to_image", "inpaint", "outpaint", "invert", "edit", "reconstruct",
           "null_text_optimization", "Inversion", "SampleOptions", "sample_checkpoint", "sdxl_text_to_image",
           "sdxl_image_to_image", "sdxl_inpaint", "MicroConditioning", "sample_folder", "sd3_text_to_image",
           "sd3_image_to_image", "super_resolve", "cascade"]
