"""AnimateDiff motion modules from diffusers folders (Guo et al. 2023): a ``MotionAdapter`` folder
inserted into a Stable Diffusion U-Net, or a whole ``UNetMotionModel`` folder, as a
:class:`~difflab.nn.motion.MotionUNet`; and back.

Usage::

    unet = load_diffusers_folder("sd15", components=("unet",)).unet
    net = load_motion_adapter("animatediff-motion-adapter", unet)      # MotionUNet around unet
    net = load_unet_motion_model("unet_motion")                          # a UNetMotionModel folder

Both folders are ``config.json`` + ``diffusion_pytorch_model.safetensors``; the names are
renamed by the table :data:`difflab.io.keymaps.motion.DIFFUSERS`. Settings difflab does not
implement (PIA's extra input channels, several middle motion layers, per-layer depths) raise a
ValueError naming them.
"""
from __future__ import annotations

from pathlib import Path

from ..nn.motion import MotionUNet, MotionUNetConfig, insert_motion_modules
from ..nn.unet_sd import UNetSD, UNetSDConfig
from .diffusers_folder import MODEL_INDEX, UNET_WEIGHTS, load_diffusers_unet
from .folders import CONFIG_NAME, load_into, read_json, read_safetensors, save_model_folder
from .keymaps import from_difflab, rename_key, to_difflab
from .keymaps.motion import ADAPTER, DIFFUSERS

# UNetMotionModel's block names -> UNet2DConditionModel's (the image network inside)
IMAGE_BLOCKS = {"CrossAttnDownBlockMotion": "CrossAttnDownBlock2D", "DownBlockMotion": "DownBlock2D",
                "CrossAttnUpBlockMotion": "CrossAttnUpBlock2D", "UpBlockMotion": "UpBlock2D"}
# UNetMotionModel config keys that shape the motion modules, not the image network
MOTION_KEYS = ("motion_max_seq_length", "motion_num_attention_heads", "reverse_motion_num_attention_heads",
               "use_motion_mid_block", "mid_block_layers", "temporal_transformer_layers_per_block",
               "reverse_temporal_transformer_layers_per_block", "temporal_transformer_layers_per_mid_block",
               "transformer_layers_per_mid_block")


def _per_level(value, levels: int, name: str, source: str):
    """One int, or one int per level (a list of equal ints or a one-entry list is fine)."""
    if isinstance(value, int):
        return value
    value = list(value)
    if len(value) != levels or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{source}: {name}={value!r} is not supported (supported: one int, or one int per level ({levels}))")
    return tuple(value)


def _single(value, name: str, source: str) -> int:
    if isinstance(value, (list, tuple)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, int):
        raise ValueError(f"{source}: {name}={value!r} is not supported (supported: one int)")
    return value


def adapter_options(config: dict, source: str = "MotionAdapter config") -> dict:
    """The :class:`MotionUNetConfig` motion fields of a diffusers ``MotionAdapter`` config.json dict."""
    levels = len(config.get("block_out_channels", (320, 640, 1280, 1280)))
    if config.get("conv_in_channels"):
        raise ValueError(f"{source}: conv_in_channels={config['conv_in_channels']} (PIA's image-conditioned input) is not "
                         "supported (supported: None)")
    if config.get("motion_mid_block_layers_per_block", 1) != 1:
        raise ValueError(f"{source}: motion_mid_block_layers_per_block={config['motion_mid_block_layers_per_block']} is not "
                         "supported (supported: 1, as UNetMotionModel's middle block)")
    max_frames = config.get("motion_max_seq_length", 32)
    return dict(num_heads=_per_level(config.get("motion_num_attention_heads", 8), levels, "motion_num_attention_heads", source),
                layers=_per_level(config.get("motion_transformer_layers_per_block", 1), levels, "motion_transformer_layers_per_block", source),
                mid_block=bool(config.get("use_motion_mid_block", True)),
                mid_layers=_single(config.get("motion_transformer_layers_per_mid_block", 1), "motion_transformer_layers_per_mid_block", source),
                max_frames=max_frames, num_frames=min(16, max_frames))


def _check_adapter_fits(config: dict, unet: UNetSD, source: str) -> None:
    """A ValueError unless the adapter's levels and layers per level are the U-Net's."""
    chans = tuple(config.get("block_out_channels", (320, 640, 1280, 1280)))
    if chans != unet.config.block_out_channels:
        raise ValueError(f"{source}: block_out_channels={list(chans)} do not match the U-Net's {list(unet.config.block_out_channels)}")
    per_block = config.get("motion_layers_per_block", 2)
    per_block = set(per_block) if isinstance(per_block, (list, tuple)) else {per_block}
    if per_block != {unet.config.layers_per_block}:
        raise ValueError(f"{source}: motion_layers_per_block={config.get('motion_layers_per_block')} does not match the U-Net's "
                         f"layers_per_block={unet.config.layers_per_block}")


def _unet(unet) -> UNetSD:
    """A UNetSD as it is, or loaded from a diffusers unet/ folder or SD pipeline folder."""
    if isinstance(unet, UNetSD):
        return unet
    folder = Path(unet)
    return load_diffusers_unet(folder / "unet" if (folder / MODEL_INDEX).is_file() else folder)


def load_motion_adapter(folder, unet) -> MotionUNet:
    """A :class:`MotionUNet` around ``unet`` (a :class:`UNetSD`, or the path of a diffusers unet/
    folder or Stable Diffusion pipeline folder) with the motion modules of the diffusers
    ``MotionAdapter`` folder ``folder``: what diffusers' ``UNetMotionModel.from_unet2d(unet,
    adapter)`` builds. ``unet`` itself is wrapped (its weights shared); eval mode."""
    folder, unet = Path(folder), _unet(unet)
    source = f"MotionAdapter folder {folder}"
    config = read_json(folder / CONFIG_NAME, "a diffusers MotionAdapter config")
    _check_adapter_fits(config, unet, source)
    net = insert_motion_modules(unet, **adapter_options(config, source))
    tensors = to_difflab(read_safetensors(folder, UNET_WEIGHTS), ADAPTER)
    stray = sorted(k for k in tensors if not k.startswith("motion."))
    if stray:
        raise ValueError(f"{source}: keys outside the motion modules: {stray[:5]}")
    expected = {k for k in net.state_dict() if k.startswith("motion.")}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        name = lambda k: rename_key(k, ADAPTER, reverse=True)[0]  # noqa: E731
        raise ValueError(f"{source}: the adapter does not match the U-Net's motion sites; missing "
                         f"{[name(k) for k in missing[:5]]}, unexpected {[name(k) for k in unexpected[:5]]}")
    net.motion.load_state_dict({k[len("motion."):]: v for k, v in tensors.items()})
    return net.eval()


def motion_adapter_config(net: MotionUNet) -> dict:
    """The diffusers ``MotionAdapter`` config.json dict of ``net``'s motion modules (around a UNetSD)."""
    c = net.config
    if (c.image_kind != "unet_sd" or c.levels is not None or not c.down_blocks or c.up_modules is not None
            or c.num_directions is not None or c.time_embedding):
        raise ValueError("a MotionAdapter holds motion modules at every level (levels=None) and in the down blocks, without "
                         f"direction labels or time embedding, of a Stable Diffusion U-Net; this MotionUNet wraps "
                         f"{c.image_kind!r} with levels={c.levels}, down_blocks={c.down_blocks}, up_modules={c.up_modules}, "
                         f"num_directions={c.num_directions}, time_embedding={c.time_embedding}")
    listed = lambda v: v if isinstance(v, int) else list(v)  # noqa: E731
    unet = net.unet.config
    return {"_class_name": "MotionAdapter", "block_out_channels": list(unet.block_out_channels),
            "motion_layers_per_block": unet.layers_per_block, "motion_transformer_layers_per_block": listed(c.layers),
            "motion_mid_block_layers_per_block": 1, "motion_transformer_layers_per_mid_block": c.mid_layers,
            "motion_num_attention_heads": listed(c.num_heads), "motion_norm_num_groups": c.norm_num_groups or unet.norm_num_groups,
            "motion_max_seq_length": c.max_frames, "use_motion_mid_block": c.mid_block, "conv_in_channels": None}


def save_motion_adapter(net: MotionUNet, folder) -> Path:
    """Write ``net``'s motion modules alone as a diffusers ``MotionAdapter`` folder (what AnimateDiff
    shares: the image model stays the user's own); returns the folder."""
    config = motion_adapter_config(net)
    tensors = from_difflab({f"motion.{k}": v for k, v in net.motion.state_dict().items()}, ADAPTER)
    return save_model_folder(folder, UNET_WEIGHTS, tensors, config)


def motion_config_from_diffusers(config: dict, source: str = "UNetMotionModel config") -> MotionUNetConfig:
    """A :class:`MotionUNetConfig` from a diffusers ``UNetMotionModel`` config.json dict."""
    image = {k: v for k, v in config.items() if k not in MOTION_KEYS}
    blocks = list(config.get("down_block_types", [])) + list(config.get("up_block_types", []))
    unknown = sorted(set(blocks) - set(IMAGE_BLOCKS))
    if unknown:
        raise ValueError(f"{source}: block types {unknown} are not supported (supported: {sorted(IMAGE_BLOCKS)})")
    for key in ("down_block_types", "up_block_types"):
        if key in config:
            image[key] = [IMAGE_BLOCKS[b] for b in config[key]]
    lpb = config.get("layers_per_block", 2)
    if isinstance(lpb, (list, tuple)) and len(set(lpb)) == 1:
        image["layers_per_block"] = lpb[0]
    image_config = UNetSDConfig.from_diffusers_config(image)
    levels = len(image_config.block_out_channels)
    if config.get("mid_block_layers", 1) != 1:
        raise ValueError(f"{source}: mid_block_layers={config['mid_block_layers']} is not supported (supported: 1)")
    mid_depth = config.get("transformer_layers_per_mid_block")
    if mid_depth is not None and mid_depth != image_config.transformer_depth(levels - 1):
        raise ValueError(f"{source}: transformer_layers_per_mid_block={mid_depth} is not supported (supported: None, the "
                         "last level's depth)")
    heads = _per_level(config.get("motion_num_attention_heads", 8), levels, "motion_num_attention_heads", source)
    layers = _per_level(config.get("temporal_transformer_layers_per_block", 1), levels, "temporal_transformer_layers_per_block", source)
    for key, down in (("reverse_motion_num_attention_heads", heads), ("reverse_temporal_transformer_layers_per_block", layers)):
        value = config.get(key)
        if value is not None and _per_level(value, levels, key, source) not in (down, tuple(reversed(down)) if not isinstance(down, int) else down):
            raise ValueError(f"{source}: {key}={value!r} is not supported (supported: None, the down levels' reversed)")
    max_frames = config.get("motion_max_seq_length", 32)
    return MotionUNetConfig(image_kind="unet_sd", image=image_config.to_dict(), num_heads=heads, layers=layers,
                            mid_block=bool(config.get("use_motion_mid_block", True)),
                            mid_layers=_single(config.get("temporal_transformer_layers_per_mid_block", 1),
                                               "temporal_transformer_layers_per_mid_block", source),
                            max_frames=max_frames, num_frames=min(16, max_frames))


def load_unet_motion_model(folder, *, variant: str | None = None) -> MotionUNet:
    """A :class:`MotionUNet` from a diffusers ``UNetMotionModel`` folder (e.g. the ``unet/`` of an
    ``AnimateDiffPipeline`` saved with its motion modules), in eval mode."""
    folder = Path(folder)
    source = f"diffusers UNetMotionModel weights in {folder}"
    config = read_json(folder / CONFIG_NAME, "a diffusers UNetMotionModel config")
    if config.get("_class_name", "UNetMotionModel") != "UNetMotionModel":
        raise ValueError(f"{folder / CONFIG_NAME} is a {config['_class_name']}; load_unet_motion_model reads UNetMotionModel "
                         "(a UNet2DConditionModel + MotionAdapter pair loads with load_motion_adapter)")
    net = MotionUNet(motion_config_from_diffusers(config, f"UNetMotionModel config in {folder}"))
    tensors = to_difflab(read_safetensors(folder, UNET_WEIGHTS, variant), DIFFUSERS)
    load_into(net, tensors, source, lambda k: rename_key(k, DIFFUSERS, reverse=True)[0])
    return net.eval()


def unet_motion_config(net: MotionUNet) -> dict:
    """The diffusers ``UNetMotionModel`` config.json dict of ``net`` (a :class:`MotionUNet` around a UNetSD)."""
    c = net.config
    if (c.image_kind != "unet_sd" or c.norm_num_groups not in (None, net.unet.config.norm_num_groups) or c.levels is not None
            or not c.down_blocks or c.up_modules is not None or c.num_directions is not None or c.time_embedding):
        raise ValueError("only a MotionUNet around a UNetSD, with the U-Net's GroupNorm groups, modules at every level "
                         "(levels=None) and every site (down_blocks=True, up_modules=None), no direction labels (num_directions=None) and no time embedding "
                         "(time_embedding=False), is a UNetMotionModel")
    d = net.unet.config.to_diffusers_config()
    d["_class_name"] = "UNetMotionModel"
    d["down_block_types"] = [b.replace("2D", "Motion") for b in d["down_block_types"]]
    d["up_block_types"] = [b.replace("2D", "Motion") for b in d["up_block_types"]]
    d["num_attention_heads"] = d.pop("attention_head_dim")
    listed = lambda v: v if isinstance(v, int) else list(v)  # noqa: E731
    d.update(motion_max_seq_length=c.max_frames, motion_num_attention_heads=listed(c.num_heads), use_motion_mid_block=c.mid_block,
             temporal_transformer_layers_per_block=listed(c.layers), temporal_transformer_layers_per_mid_block=c.mid_layers)
    return d


def save_unet_motion_model(net: MotionUNet, folder) -> Path:
    """Write ``net`` as a diffusers ``UNetMotionModel`` folder (config.json + weights); returns the folder."""
    config = unet_motion_config(net)
    return save_model_folder(folder, UNET_WEIGHTS, from_difflab(net.state_dict(), DIFFUSERS), config)


__all__ = ["adapter_options", "load_motion_adapter", "motion_adapter_config", "save_motion_adapter", "motion_config_from_diffusers", "load_unet_motion_model",
           "unet_motion_config", "save_unet_motion_model", "IMAGE_BLOCKS", "MOTION_KEYS"]
