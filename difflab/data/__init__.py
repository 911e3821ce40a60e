"""Data: the embedded digits, image folders and 2-D toy sets, all as tensors in [-1, 1] (images)
or of roughly unit variance (points)."""
from .audio import load_audio
from .digits import NUM_CLASSES, load_digits, same_class_partner, stratified_split
from .folder import IMAGE_SUFFIXES, ON_ERROR, ImageReadError, image_files, image_tensor, load_image, load_image_folder, read_image
from .moving_digits import DIRECTIONS, Clips, caption, moving_digits, still_frames
from .scenes import Scenes, load_scenes
from .toy import gaussian_mixture, moons, ring_means, swiss_roll

__all__ = [
    "load_digits", "stratified_split", "same_class_partner", "NUM_CLASSES", "load_audio", "load_image", "load_image_folder", "image_files", "IMAGE_SUFFIXES",
    "read_image", "image_tensor", "ImageReadError", "ON_ERROR",
    "moving_digits", "still_frames", "Clips", "caption", "DIRECTIONS",
    "moons", "swiss_roll", "gaussian_mixture", "ring_means",
    "load_scenes", "Scenes",
]
