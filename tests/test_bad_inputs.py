"""The bad-input catalogue: every way a user can hand difflab something wrong, with the exit status
and a phrase the one-line message must hold. No case may print a traceback or leave a temporary
file behind. A new command adds its cases here (docs/design.md, "a command").

Command-line cases run ``difflab.cli.main`` in-process (an exception escaping it is what a user
would see as a traceback); API cases call the library and expect a ``ValueError`` or a
``FileNotFoundError`` (or a subclass) whose message holds the phrase, never a ``TypeError``,
``KeyError``, ``IndexError`` or ``RuntimeError`` from deep inside.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from difflab.adapters.controlnet import ControlledUNet, ControlNet, ControlNetConfig
from difflab.adapters.lora import load_lora, load_lora_weights
from difflab.cli import main
from difflab.config import ConfigError
from difflab.core import Denoiser, VPDiscrete
from difflab.data.detour import DetourConfig, DetourEnv, run_episodes
from difflab.data.folder import load_image_folder
from difflab.data.shapes3d import load_shapes3d, make_shape
from difflab.data.stick_figures import make_motions
from difflab.data.provenance import provenance
from difflab.eval import evaluate, fid, memorization, precision_recall
from difflab.eval.motion_judge import bone_length_drift
from difflab.eval.point_metrics import emd, pairwise, shape_set_metrics
from difflab.guidance import ClassifierFreeGuidance
from difflab.io.checkpoint import NonFiniteError, load_checkpoint, save_checkpoint
from difflab.io.diffusers_folder import load_diffusers_folder
from difflab.io.dit_files import save_diffusers_dit
from difflab.io.motion_folder import load_motion_adapter, load_unet_motion_model
from difflab.io.ply import read_ply, write_ply
from difflab.io.sd3_folder import load_sd3_folder
from difflab.io.spec import DEFAULT_DIFFUSION, build_denoiser, load_denoiser, make_spec
from difflab.nn.diffwave import DiffWaveConfig
from difflab.nn.dit import DiT, DiTConfig
from difflab.nn.mdm import MDMConfig
from difflab.nn.mmdit import MMDiTConfig
from difflab.nn.motion import PRESETS as MOTION_PRESETS
from difflab.nn.motion import MotionUNet, MotionUNetConfig
from difflab.nn.point_transformer import PointTransformer, PointTransformerConfig
from difflab.nn.temporal_unet import TemporalUNet, TemporalUNetConfig
from difflab.nn.text import TinyTextConfig, TinyTextEncoder
from difflab.nn.unet import UNet, UNetConfig
from difflab.nn.unet_sd import UNetSD, UNetSDConfig
from difflab.nn.voxels import VoxelGrid, orbit_rays
from difflab.perf.fp8 import swap_fp8_training
from difflab.pipelines import SampleOptions, generate, text_to_image
from difflab.pipelines.motion import (
    edit_motions,
    joint_mask,
    keyframe_mask,
    sample_motions,
)
from difflab.pipelines.points import generate_points
from difflab.pipelines.policy import sample_action_chunks
from difflab.pipelines.score_distillation import SDSConfig, distill_views
from difflab.pipelines.sd3 import sd3_sigmas
from difflab.samplers import get_sampler
from difflab.samplers.euler import sample_euler
from difflab.studio.catalogue import resolve_model
from difflab.studio.forms import check_request, decode_image
from difflab.studio.params import parse_parameters
from difflab.train import TrainConfig, train
from difflab.train.dreambooth import save_text_model

# ----------------------------------------------------------------------------------------------
# Fixtures: one tiny trained run, and the broken things made from it


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    run = root / "run"
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps({"train": {"steps": 2, "batch_size": 8, "checkpoint_every": 0, "progress": False}}))
    assert main(["train", "--config", str(cfg), "--preset", "tiny", "--out", str(run), "--device", "cpu"]) == 0
    ckpt = run / "checkpoint.safetensors"
    tensors, meta = load_checkpoint(ckpt)
    key = next(k for k in tensors if k.startswith("ema.") and tensors[k].is_floating_point())
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    bad[key].view(-1)[0] = math.nan
    save_checkpoint(root / "nan.safetensors", bad, meta)
    shape = dict(tensors)
    conv = next(k for k in sorted(tensors) if k.startswith("model.") and tensors[k].ndim == 4)
    shape[conv] = torch.zeros(tensors[conv].shape[0] + 1, *tensors[conv].shape[1:])
    save_checkpoint(root / "shape.safetensors", shape, meta)
    (root / "garbage.safetensors").write_bytes(b"this is not a safetensors file")
    (root / "truncated.safetensors").write_bytes(ckpt.read_bytes()[:200])
    (root / "notes.txt").write_text("hello")
    (root / "stats.npz").write_bytes(b"not read: --memorization refuses statistics first")
    (root / "a_folder").mkdir()
    (root / "existing_file").write_text("x")
    (root / "empty").mkdir()
    (root / "sd3").mkdir()  # a pipeline folder's index alone: enough for the checks made before any weights are read
    (root / "sd3" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    (root / "x4").mkdir()  # an upscaler folder's index alone: --image is checked before any weights are read
    (root / "x4" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline"}))
    # a file whose tensor names are SD3's original layout: single_file_family reads the names alone
    save_file({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(3, 1)}, str(root / "sd3_file.safetensors"))
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(images / f"{i}.png")
    configs = {
        "typo": {"train": {"lerning_rate": 1e-3}},
        "top": {"trian": {"steps": 2}},
        "type": {"train": {"steps": "abc"}},
        "spec": {"spec": {"unet": {"model_chanels": 8}}},
        "diffusion": {"spec": {"unet": {}, "diffusion": {"frame": "vp_discrete", "shedule": "cosine"}}},
        "unet_spec": {"spec": {"unet": {"model_channels": 8}}},
        "dit_patch3": {"spec": {"network": {"kind": "dit", "config": {"patch_size": 3, "hidden_size": 16, "depth": 1}}}},
        "moe_top_k3": {"spec": {"network": {"kind": "moe-dit", "config": {"hidden_size": 16, "depth": 1, "moe_experts": 2,
                                                                         "moe_top_k": 3}}}},
    }
    for name, body in configs.items():
        (root / f"{name}.json").write_text(json.dumps(body))
    (root / "broken.json").write_text("{not json")
    (root / "list.json").write_text("[1, 2]")
    (root / "nan_train.json").write_text('{"train": {"lr": NaN}}')
    (root / "every_step.json").write_text(json.dumps({"train": {"steps": 5, "batch_size": 8, "checkpoint_every": 1,
                                                                 "progress": False}}))
    (root / "locked").mkdir()  # held by a live process on this host (the one that started the tests)
    (root / "locked" / "train.lock").write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname()}))
    (root / "locked_elsewhere").mkdir()
    (root / "locked_elsewhere" / "train.lock").write_text(json.dumps({"pid": 1, "host": "another-machine"}))
    # image folders with broken files (data/folder.py), and a tiny text model for dreambooth to reach them
    png = (images / "0.png").read_bytes()
    big = root / "big.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(big)
    broken = {"bad_truncated": {"0.png": png, "cut.png": big.read_bytes()[:1500]},
              "bad_empty": {"0.png": png, "empty.png": b""},
              "bad_text": {"0.png": png, "notes.jpg": b"hello, not a picture"},
              "bad_all": {"cut.png": big.read_bytes()[:1500], "empty.png": b"", "notes.jpg": b"hello"}}
    for folder, files in broken.items():
        (root / folder).mkdir()
        for name, data in files.items():
            (root / folder / name).write_bytes(data)
    unet = UNetConfig(in_channels=1, model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(0,),
                      num_heads=2, context_dim=16, groups=4)
    text_spec = {"unet": unet.to_dict(), "diffusion": DEFAULT_DIFFUSION}
    text = TinyTextEncoder.from_texts(["a digit"], max_length=6, width=16, layers=1, heads=2)
    save_text_model(root / "text_base", build_denoiser(text_spec), text, text_spec, {"size": 8})
    # audio checkpoints (nn/diffwave.py): a class-conditional waveform model and a vocoder, one step each
    one_step = TrainConfig(steps=1, batch_size=2, checkpoint_every=0, log_every=0, progress=False, ema_decay=0.5)
    for name, extra, data in (("wave_run", {"num_classes": 2}, (torch.zeros(2, 1, 64), torch.tensor([0, 1]))),
                              ("vocoder_run", {"n_mels": 4}, (torch.zeros(2, 1, 64), None, {"mel": torch.zeros(2, 4, 5)}))):
        spec = make_spec("diffwave", DiffWaveConfig(residual_channels=4, layers=2, dilation_cycle=2, sample_length=64, hop=16,
                                                    upsample_strides=(4, 4), **extra), DEFAULT_DIFFUSION)
        train(build_denoiser(spec, seed=0), data, one_step, root / name, spec=spec)
    return root


# ----------------------------------------------------------------------------------------------
# The catalogue: (id, argv with {root} for the fixture folder, exit status, phrase in the message)

T = ["train", "--preset", "tiny", "--device", "cpu", "--out", "{root}/out_train"]
S = ["sample", "--checkpoint", "{root}/run", "--out", "{root}/s.png", "--steps", "2", "--device", "cpu"]
SM = ["sample", "--model", "{root}/sd3", "--out", "{root}/s.png"]  # a pipeline folder (its model_index.json alone)
E = ["eval", "--generated", "{root}/images", "--reference", "{root}/images", "--no-progress", "--device", "cpu"]
D = ["distill", "--method", "progressive", "--teacher", "{root}/run", "--out", "{root}/distilled", "--steps", "1",
     "--batch-size", "4", "--device", "cpu", "--no-progress"]
M = ["sample", "--model", "{root}/text_base", "--out", "{root}/s.png", "--steps", "2", "--device", "cpu"]
DB = ["dreambooth", "--base", "{root}/run", "--images", "{root}/images", "--class-prompt", "a digit",
      "--out", "{root}/db", "--no-progress", "--device", "cpu"]

CLI_CASES = [
    # no command, unknown command
    ("no-command", [], 2, "usage"),
    ("unknown-command", ["paint"], 2, "invalid choice"),
    # train: numbers
    ("train-steps-0", [*T, "--steps", "0"], 2, "--steps"),
    ("train-steps-negative", [*T, "--steps", "-5"], 2, "--steps"),
    ("train-lr-negative", [*T, "--lr", "-1"], 2, "--lr"),
    ("train-lr-nan", [*T, "--lr", "nan"], 2, "--lr"),
    ("train-lr-inf", [*T, "--lr", "inf"], 2, "--lr"),
    ("train-batch-size-0", [*T, "--batch-size", "0"], 2, "--batch-size"),
    ("train-steps-not-a-number", [*T, "--steps", "abc"], 2, "--steps"),
    # train: configs
    ("train-config-missing", [*T, "--config", "{root}/nope.json"], 2, "does not exist"),
    ("train-config-not-json", [*T, "--config", "{root}/broken.json"], 2, "JSON"),
    ("train-config-not-object", [*T, "--config", "{root}/list.json"], 2, "JSON object"),
    ("train-config-typo", [*T, "--config", "{root}/typo.json"], 2, "lerning_rate"),
    ("train-config-top-level-typo", [*T, "--config", "{root}/top.json"], 2, "trian"),
    ("train-config-wrong-type", [*T, "--config", "{root}/type.json"], 2, "steps"),
    ("train-config-spec-typo", [*T, "--config", "{root}/spec.json"], 2, "model_chanels"),
    ("train-config-nested-typo", [*T, "--config", "{root}/diffusion.json"], 2, "shedule"),
    ("train-config-nan", [*T, "--config", "{root}/nan_train.json"], 2, "lr"),
    # train: paths and devices
    ("train-data-is-a-file", [*T, "--data", "{root}/notes.txt", "--size", "8"], 2, "--data"),
    ("train-data-missing", [*T, "--data", "{root}/nowhere", "--size", "8"], 2, "--data"),
    ("train-data-empty-folder", [*T, "--data", "{root}/empty", "--size", "8"], 2, "no images"),
    ("train-folder-needs-size", [*T, "--data", "{root}/images"], 2, "--size"),
    ("train-device-tpu", [*T, "--device", "tpu"], 2, "--device"),
    ("train-out-is-a-file", ["train", "--preset", "tiny", "--out", "{root}/existing_file"], 2, "--out"),
    ("train-preset-unknown", [*T, "--preset", "huge"], 2, "--preset"),
    ("train-precision-unknown", [*T, "--precision", "fp8"], 2, "invalid choice"),
    ("train-network-unknown", [*T, "--network", "transformer"], 2, "--network"),
    ("train-dit-preset-unknown", ["train", "--network", "dit", "--preset", "DiT-XXL/2", "--device", "cpu", "--out",
                                  "{root}/out_train"], 2, "DiT-S/2"),
    ("train-dit-patch-not-dividing", ["train", "--network", "dit", "--config", "{root}/dit_patch3.json", "--device", "cpu",
                                      "--out", "{root}/out_train"], 2, "patch_size=3 must divide"),
    ("train-network-contradicts-config", [*T, "--network", "dit", "--config", "{root}/unet_spec.json"], 2, "contradicts"),
    ("train-moe-dit-preset-unknown", ["train", "--network", "moe-dit", "--preset", "DiT-XXL/2", "--device", "cpu", "--out",
                                      "{root}/out_train"], 2, "DiT-S/2"),
    ("train-moe-dit-top-k-over-experts", ["train", "--network", "moe-dit", "--config", "{root}/moe_top_k3.json", "--device",
                                          "cpu", "--out", "{root}/out_train"], 2, "moe_top_k=3 must be an integer in 1..moe_experts=2"),
    ("train-fp8-with-fp16", [*T, "--fp8", "--precision", "fp16"], 2, "fp8=True combines with precision"),
    ("train-fp8-with-ddp", [*T, "--fp8", "--parallel", "ddp"], 2, "fp8=True trains in one process"),
    # train: the run itself
    ("train-diverges", ["train", "--preset", "tiny", "--device", "cpu", "--config", "{root}/tiny.json", "--lr", "1e30",
                        "--out", "{root}/diverged"], 2, "diverged"),
    ("train-diverges-after-a-checkpoint", ["train", "--preset", "tiny", "--device", "cpu", "--config", "{root}/every_step.json",
                                           "--lr", "1e30", "--out", "{root}/diverged_later"], 2, "(step 1)"),
    ("train-folder-in-use", [*T[:-2], "--config", "{root}/tiny.json", "--out", "{root}/locked"], 2, "in use by another run"),
    ("train-folder-locked-elsewhere", [*T[:-2], "--config", "{root}/tiny.json", "--out", "{root}/locked_elsewhere"], 2,
     "another-machine"),
    # sample
    ("sample-checkpoint-missing", [*S[:1], "--checkpoint", "{root}/missing", "--out", "{root}/s.png"], 2, "does not exist"),
    ("sample-sampler-unknown", [*S, "--sampler", "nope"], 2, "nope"),
    ("sample-steps-0", [*S, "--steps", "0"], 2, "--steps"),
    ("sample-steps-negative", [*S, "--steps", "-3"], 2, "--steps"),
    ("sample-guidance-nan", [*S, "--guidance", "nan"], 2, "--guidance"),
    ("sample-guidance-inf", [*S, "--guidance", "inf"], 2, "--guidance"),
    ("sample-eta-without-eta", [*S, "--sampler", "euler", "--eta", "0.5"], 2, "--eta"),
    ("sample-seed-negative", [*S, "--seed", "-1"], 2, "--seed"),
    ("sample-num-0", [*S, "--num", "0"], 2, "--num"),
    ("sample-classes-out-of-range", [*S, "--classes", "3,12"], 2, "[0, 9]"),
    ("sample-classes-not-numbers", [*S, "--classes", "a,b"], 2, "--classes"),
    ("sample-out-is-a-folder", [*S[:-5], "--out", "{root}/a_folder", "--steps", "2", "--device", "cpu"], 2, "--out"),
    ("sample-nan-weights", [*S[:1], "--checkpoint", "{root}/nan.safetensors", "--out", "{root}/s.png"], 2, "not finite"),
    ("sample-not-safetensors", [*S[:1], "--checkpoint", "{root}/garbage.safetensors", "--out", "{root}/s.png"], 2, "safetensors"),
    ("sample-truncated", [*S[:1], "--checkpoint", "{root}/truncated.safetensors", "--out", "{root}/s.png"], 2, "safetensors"),
    ("sample-text-file", [*S[:1], "--checkpoint", "{root}/notes.txt", "--out", "{root}/s.png"], 2, "notes.txt"),
    ("sample-device-tpu", [*S, "--device", "tpu"], 2, "--device"),
    ("sample-weights-unknown", [*S, "--weights", "best"], 2, "invalid choice"),
    ("sample-audio-to-png", ["sample", "--checkpoint", "{root}/wave_run", "--out", "{root}/s.png"], 2, "give a .wav path"),
    ("sample-audio-vocoder", ["sample", "--checkpoint", "{root}/vocoder_run", "--out", "{root}/s.wav"], 2, "vocoder"),
    ("sample-audio-classes-out-of-range", ["sample", "--checkpoint", "{root}/wave_run", "--out", "{root}/s.wav", "--steps", "1",
                                           "--classes", "5"], 2, "[0, 1]"),
    ("sample-model-and-checkpoint", [*S, "--model", "{root}/text_base"], 2, "exactly one of --checkpoint"),
    ("sample-neither-model-nor-checkpoint", ["sample", "--out", "{root}/s.png"], 2, "exactly one of --checkpoint"),
    ("sample-model-without-prompt", [*M], 2, "--prompt"),
    ("sample-model-missing", ["sample", "--model", "{root}/nope", "--prompt", "a digit"], 2, "not a folder"),
    ("sample-model-not-a-model", ["sample", "--model", "{root}/a_folder", "--prompt", "a digit"], 2, "not a model folder"),
    ("sample-model-with-classes", [*M, "--prompt", "a digit", "--classes", "3"], 2, "--classes"),
    ("sample-prompt-without-model", [*S, "--prompt", "a digit"], 2, "--prompt needs --model"),
    ("sample-model-sampler-unknown", [*M, "--prompt", "a digit", "--sampler", "nope"], 2, "nope"),
    ("sample-model-height-0", [*M, "--prompt", "a", "--height", "0"], 2, "--height"),
    ("sample-model-no-index", ["sample", "--model", "{root}/run", "--prompt", "a", "--out", "{root}/s.png"], 2, "not a model folder"),
    ("sample-model-eta-without-eta", [*SM, "--prompt", "a", "--sampler", "flow_euler", "--eta", "0.5"], 2, "--eta"),
    ("sample-model-dtype-unknown", [*SM, "--prompt", "a", "--dtype", "int8"], 2, "invalid choice"),
    ("sample-base-needs-model", [*S, "--base", "{root}/sd3"], 2, "--base needs --model"),
    ("sample-base-with-a-folder", [*SM, "--prompt", "a", "--base", "{root}/sd3"], 2, "single-file"),
    ("sample-single-file-without-base", ["sample", "--model", "{root}/sd3_file.safetensors", "--prompt", "a", "--out",
                                         "{root}/s.png"], 2, "--base"),
    ("sample-base-not-a-folder", ["sample", "--model", "{root}/sd3_file.safetensors", "--base", "{root}/notes.txt", "--prompt",
                                  "a", "--out", "{root}/s.png"], 2, "not a folder"),
    ("sample-dtype-without-model", [*S, "--dtype", "bfloat16"], 2, "--dtype needs --model"),
    ("sample-image-without-model", [*S, "--image", "{root}/big.png"], 2, "--image needs --model"),
    ("sample-image-to-a-text-model", [*SM, "--prompt", "a", "--image", "{root}/big.png"], 2, "--image: image is for upscaler folders"),
    ("sample-upscaler-without-image", ["sample", "--model", "{root}/x4", "--prompt", "a", "--out", "{root}/s.png"], 2, "give image="),
    ("sample-upscaler-image-missing", ["sample", "--model", "{root}/x4", "--prompt", "a", "--image", "{root}/nope.png",
                                       "--out", "{root}/s.png"], 2, "nope.png is not a file"),
    ("sample-upscaler-image-not-an-image", ["sample", "--model", "{root}/x4", "--prompt", "a", "--image", "{root}/notes.txt",
                                            "--out", "{root}/s.png"], 2, "not a readable image"),
    # eval
    ("eval-generated-missing", ["eval", "--generated", "{root}/missing"], 2, "does not exist"),
    ("eval-metric-unknown", [*E, "--metrics", "fid,beauty"], 2, "beauty"),
    ("eval-extractor-unknown", [*E, "--extractor", "vgg"], 2, "vgg"),
    ("eval-weights-not-safetensors", [*E, "--weights", "{root}/notes.txt"], 2, "--weights"),
    ("eval-nan-checkpoint", ["eval", "--generated", "{root}/nan.safetensors", "--reference", "digits", "--num", "4", "--no-progress"], 2, "not finite"),
    ("eval-num-0", [*E, "--num", "0"], 2, "--num"),
    ("eval-prompts-missing", [*E, "--metrics", "clip_score", "--prompts", "{root}/nope.txt"], 2, "--prompts"),
    ("eval-steps-0", ["eval", "--generated", "{root}/run", "--steps", "0", "--no-progress"], 2, "--steps"),
    ("eval-memorization-train-missing", [*E, "--memorization", "{root}/nowhere"], 2, "--memorization"),
    ("eval-memorization-train-is-a-file", [*E, "--memorization", "{root}/notes.txt"], 2, "--memorization"),
    ("eval-memorization-of-statistics", ["eval", "--generated", "{root}/stats.npz", "--memorization", "digits"], 2,
     "--memorization"),
    # demo
    ("demo-steps-0", ["demo", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    ("demo-guidance-nan", ["demo", "--guidance", "nan", "--out-dir", "{root}/demo"], 2, "--guidance"),
    ("demo-sampler-unknown", ["demo", "--sampler", "nope"], 2, "invalid choice"),
    ("demo-cascade-aug-sigma-negative", ["demo", "--cascade", "--aug-sigma", "-0.5", "--out-dir", "{root}/demo"], 2, "--aug-sigma"),
    ("demo-cascade-aug-sigma-nan", ["demo", "--cascade", "--aug-sigma", "nan", "--out-dir", "{root}/demo"], 2, "--aug-sigma"),
    ("demo-cascade-sr-steps-0", ["demo", "--cascade", "--sr-steps", "0", "--out-dir", "{root}/demo"], 2, "--sr-steps"),
    ("demo-aug-sigma-without-cascade", ["demo", "--aug-sigma", "0.2", "--out-dir", "{root}/demo"], 2, "needs --cascade"),
    ("demo-truncated-without-cascade", ["demo", "--truncated", "--out-dir", "{root}/demo"], 2, "needs --cascade"),
    ("demo-cascade-and-text", ["demo", "--cascade", "--text", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-policy-and-text", ["demo", "--policy", "--text", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-policy-and-cascade", ["demo", "--policy", "--cascade", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-policy-resume", ["demo", "--policy", "--resume", "--out-dir", "{root}/demo"], 2, "--resume"),
    ("demo-policy-aug-sigma", ["demo", "--policy", "--aug-sigma", "0.2", "--out-dir", "{root}/demo"], 2, "needs --cascade"),
    ("demo-policy-steps-0", ["demo", "--policy", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    ("demo-policy-guidance-nan", ["demo", "--policy", "--guidance", "nan", "--out-dir", "{root}/demo"], 2, "--guidance"),
    ("demo-policy-sampler", ["demo", "--policy", "--sampler", "nope", "--out-dir", "{root}/demo"], 2, "--sampler"),
    ("demo-audio-and-text", ["demo", "--audio", "--text", "--out-dir", "{root}/demo"], 2, "give one of"),
    ("demo-audio-and-cascade", ["demo", "--audio", "--cascade", "--out-dir", "{root}/demo"], 2, "give one of"),
    ("demo-audio-steps-0", ["demo", "--audio", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    ("demo-audio-sr-steps", ["demo", "--audio", "--sr-steps", "5", "--out-dir", "{root}/demo"], 2, "needs --cascade"),
    ("demo-video-and-text", ["demo", "--video", "--text", "--out-dir", "{root}/demo"], 2, "not both --text and --video"),
    ("demo-video-and-cascade", ["demo", "--video", "--cascade", "--out-dir", "{root}/demo"], 2, "not both --cascade and --video"),
    ("demo-video-network-without-video", ["demo", "--video-network", "space_time_unet", "--out-dir", "{root}/demo"], 2,
     "needs --video"),
    ("demo-image-fraction-without-video", ["demo", "--image-fraction", "0.2", "--out-dir", "{root}/demo"], 2, "needs --video"),
    ("demo-video-network-unknown", ["demo", "--video", "--video-network", "nope"], 2, "invalid choice"),
    ("demo-video-image-fraction-1", ["demo", "--video", "--image-fraction", "1", "--out-dir", "{root}/demo"], 2,
     "--image-fraction"),
    ("demo-video-image-fraction-negative", ["demo", "--video", "--image-fraction", "-0.1", "--out-dir", "{root}/demo"], 2,
     "--image-fraction"),
    ("demo-video-steps-0", ["demo", "--video", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    ("demo-direction-guidance-without-video", ["demo", "--direction-guidance", "1", "--out-dir", "{root}/demo"], 2,
     "needs --video"),
    ("demo-video-direction-guidance-negative", ["demo", "--video", "--direction-guidance", "-1", "--out-dir", "{root}/demo"],
     2, "--direction-guidance"),
    ("demo-end-frame-weight-without-video", ["demo", "--end-frame-weight", "2", "--out-dir", "{root}/demo"], 2,
     "needs --video"),
    ("demo-video-end-frame-weight-nan", ["demo", "--video", "--end-frame-weight", "nan", "--out-dir", "{root}/demo"], 2,
     "--end-frame-weight"),
    ("demo-velocity-weight-without-video", ["demo", "--velocity-weight", "1", "--out-dir", "{root}/demo"], 2,
     "needs --video"),
    ("demo-video-velocity-weight-negative", ["demo", "--video", "--velocity-weight", "-1", "--out-dir", "{root}/demo"], 2,
     "--velocity-weight"),
    ("demo-class-guidance-without-video", ["demo", "--class-guidance", "1", "--out-dir", "{root}/demo"], 2,
     "needs --video"),
    ("demo-video-class-guidance-negative", ["demo", "--video", "--class-guidance", "-1", "--out-dir", "{root}/demo"], 2,
     "--class-guidance"),
    ("demo-eta-without-video", ["demo", "--eta", "1.5", "--out-dir", "{root}/demo"], 2, "needs --video"),
    ("demo-video-eta-negative", ["demo", "--video", "--eta", "-1", "--out-dir", "{root}/demo"], 2, "--eta"),
    ("demo-video-eta-sampler-without-eta", ["demo", "--video", "--sampler", "heun", "--eta", "1", "--out-dir", "{root}/demo"],
     2, "sampler 'heun' has no eta"),
    # 3-D (issue 21)
    ("demo-3d-and-video", ["demo", "--3d", "--video", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-3d-resume", ["demo", "--3d", "--resume", "--out-dir", "{root}/demo"], 2, "--resume"),
    ("demo-3d-skip-both", ["demo", "--3d", "--skip-points", "--skip-sds", "--out-dir", "{root}/demo"], 2, "nothing to run"),
    ("demo-3d-prior-missing", ["demo", "--3d", "--prior", "{root}/nope", "--out-dir", "{root}/demo"], 2, "--prior"),
    ("demo-3d-samples-per-class-1", ["demo", "--3d", "--samples-per-class", "1", "--out-dir", "{root}/demo"], 2,
     "--samples-per-class"),
    ("demo-3d-num-points-0", ["demo", "--3d", "--num-points", "0", "--out-dir", "{root}/demo"], 2, "--num-points"),
    ("demo-3d-sds-steps-0", ["demo", "--3d", "--sds-steps", "0", "--out-dir", "{root}/demo"], 2, "--sds-steps"),
    ("demo-vsd-without-3d", ["demo", "--vsd", "--out-dir", "{root}/demo"], 2, "needs --3d"),
    ("demo-prior-without-3d", ["demo", "--prior", "{root}/run", "--out-dir", "{root}/demo"], 2, "needs --3d"),
    ("demo-video-motion-modules-image-fraction", ["demo", "--video", "--video-network", "motion_modules", "--image-fraction", "0.2",
                                                  "--out-dir", "{root}/demo"], 2, "joint image-and-video training"),
    ("demo-depth-and-video", ["demo", "--depth", "--video", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-depth-steps-0", ["demo", "--depth", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    ("demo-depth-resample-0", ["demo", "--depth", "--resample", "0", "--out-dir", "{root}/demo"], 2, "--resample"),
    ("demo-resample-without-depth", ["demo", "--resample", "2", "--out-dir", "{root}/demo"], 2, "needs --depth"),
    ("demo-depth-generation-sampler-unknown", ["demo", "--depth", "--generation-sampler", "nope", "--out-dir", "{root}/demo"], 2,
     "--generation-sampler"),
    ("demo-generation-sampler-without-depth", ["demo", "--generation-sampler", "ddim", "--out-dir", "{root}/demo"], 2,
     "needs --depth"),
    ("demo-slots-and-depth", ["demo", "--slots", "--depth", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-slots-guidance", ["demo", "--slots", "--guidance", "2", "--out-dir", "{root}/demo"], 2, "--guidance"),
    ("demo-slots-samples-per-class", ["demo", "--slots", "--samples-per-class", "3", "--out-dir", "{root}/demo"], 2,
     "--samples-per-class"),
    ("demo-slots-resample", ["demo", "--slots", "--resample", "2", "--out-dir", "{root}/demo"], 2, "needs --depth"),
    ("demo-slots-steps-0", ["demo", "--slots", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    # dreambooth
    ("dreambooth-base-missing", [*DB[:1], "--base", "{root}/nope", *DB[3:]], 2, "--base"),
    ("dreambooth-base-not-text-model", DB, 2, "text"),
    ("dreambooth-images-missing", [*DB[:3], "--images", "{root}/nope", *DB[5:]], 2, "--images"),
    ("dreambooth-images-file", [*DB[:3], "--images", "{root}/notes.txt", *DB[5:]], 2, "--images"),
    ("dreambooth-steps-0", [*DB, "--steps", "0"], 2, "--steps"),
    # memory, bench
    ("memory-preset-unknown", ["memory", "--preset", "nope"], 2, "nope"),
    ("memory-gpu-gb-0", ["memory", "--preset", "sdxl", "--gpu-gb", "0"], 2, "--gpu-gb"),
    ("memory-gpu-gb-not-a-family", ["memory", "--preset", "tiny", "--gpu-gb", "12"], 2, "family presets"),
    ("memory-family-measure", ["memory", "--preset", "flux", "--measure"], 2, "meta device"),
    ("memory-family-resolution-odd", ["memory", "--preset", "sd3", "--image-size", "1000"], 2, "multiple of 16"),
    ("memory-dit-preset-unknown", ["memory", "--preset", "dit:DiT-XXL/2"], 2, "DiT-XL/2"),
    ("memory-moe-dit-preset-unknown", ["memory", "--preset", "moe-dit:DiT-XXL/2"], 2, "DiT-XL/2"),
    ("memory-batch-size-0", ["memory", "--preset", "tiny", "--batch-size", "0"], 2, "--batch-size"),
    ("bench-workload-unknown", ["bench", "--quick", "--workloads", "warp_drive"], 2, "warp_drive"),
    # check (cli/check.py)
    ("check-no-argument", ["check"], 2, "CKPT"),
    ("check-missing", ["check", "{root}/nope.safetensors"], 2, "does not exist"),
    ("check-empty-folder", ["check", "{root}/a_folder"], 2, "no checkpoint"),
    ("check-text-file", ["check", "{root}/notes.txt"], 2, "not a .safetensors checkpoint"),
    ("check-garbage", ["check", "{root}/garbage.safetensors"], 2, "not a valid safetensors file"),
    ("check-truncated", ["check", "{root}/truncated.safetensors"], 2, "not a valid safetensors file"),
    ("check-nan", ["check", "{root}/nan.safetensors"], 2, "not finite"),
    ("check-shape-mismatch", ["check", "{root}/shape.safetensors"], 2, "but the UNet its metadata describes has"),
    ("check-sha256-wrong", ["check", "{root}/run", "--sha256", "0" * 64], 2, "sha256 mismatch"),
    ("check-sha256-not-hex", ["check", "{root}/run", "--sha256", "xyz"], 2, "--sha256"),
    # image folders (data/folder.py)
    ("train-folder-truncated-png", [*T, "--data", "{root}/bad_truncated", "--size", "8"], 2, "cut.png"),
    ("train-folder-all-bad-skip", [*T, "--data", "{root}/bad_all", "--size", "8", "--bad-images", "skip"], 2, "no readable images"),
    ("train-folder-zero-byte-png", [*T, "--data", "{root}/bad_empty", "--size", "8"], 2, "empty.png"),
    ("train-folder-text-as-jpg", [*T, "--data", "{root}/bad_text", "--size", "8"], 2, "notes.jpg"),
    ("train-bad-images-unknown", [*T, "--data", "{root}/images", "--size", "8", "--bad-images", "ignore"], 2, "invalid choice"),
    ("dreambooth-images-corrupt", [*DB[:1], "--base", "{root}/text_base", "--images", "{root}/bad_truncated", *DB[5:]], 2, "cut.png"),
    ("eval-generated-unreadable-image", ["eval", "--generated", "{root}/bad_all", "--reference", "digits", "--no-progress"], 2, "cut.png"),
    # distill (cli/distill.py)
    ("distill-teacher-missing", [*D[:4], "{root}/nope", *D[5:]], 2, "does not exist"),
    ("distill-method-unknown", ["distill", "--method", "magic", *D[2:]], 2, "invalid choice"),
    ("distill-steps-0", [*D, "--steps", "0"], 2, "--steps"),
    ("distill-guidance-nan", [*D, "--guidance", "nan"], 2, "--guidance"),
    ("distill-steps-not-halvable", [*D, "--teacher-steps", "6", "--student-steps", "4"], 2, "power of two"),
    ("distill-reflow-needs-flow", ["distill", "--method", "reflow", *D[3:]], 2, "must be 'flow'"),
    ("distill-out-is-a-file", [*D[:6], "{root}/existing_file", *D[7:]], 2, "--out"),
    ("distill-teacher-not-a-checkpoint", [*D[:4], "{root}/notes.txt", *D[5:]], 2, "safetensors"),
    ("distill-teacher-nan", [*D[:4], "{root}/nan.safetensors", *D[5:]], 2, "not finite"),
    ("distill-data-missing", [*D, "--data", "{root}/nowhere"], 2, "--data"),
    ("distill-lcm-needs-a-text-model", ["distill", "--method", "lcm", *D[3:]], 2, "text-to-image model"),
    ("distill-progressive-of-a-text-model", [*D[:4], "{root}/text_base", *D[5:]], 2, "image checkpoint"),
    ("distill-w-range-inverted", [*D, "--w-min", "3", "--w-max", "2"], 2, "--w-min"),
    ("distill-lcm-rank-0", ["distill", "--method", "lcm-lora", *D[3:4], "{root}/text_base", *D[5:], "--rank", "0"], 2,
     "--rank"),
    ("distill-lcm-data-not-captioned", ["distill", "--method", "lcm", *D[3:4], "{root}/text_base", *D[5:]], 2,
     "captioned digits"),
    # studio (cli/studio.py): everything is checked before the server listens
    ("studio-models-missing", ["studio", "--models", "{root}/nowhere"], 2, "not a folder"),
    ("studio-models-is-a-file", ["studio", "--models", "{root}/notes.txt"], 2, "not a folder"),
    ("studio-host-not-an-address", ["studio", "--models", "{root}/empty", "--host", "my machine"], 2, "not an IP address"),
    ("studio-port-out-of-range", ["studio", "--models", "{root}/empty", "--port", "70000"], 2, "--port"),
    ("studio-max-upload-0", ["studio", "--models", "{root}/empty", "--max-upload-mb", "0"], 2, "--max-upload-mb"),
    ("studio-gallery-is-a-file", ["studio", "--models", "{root}/empty", "--gallery", "{root}/existing_file"], 2, "--gallery"),
    ("studio-device-unknown", ["studio", "--models", "{root}/empty", "--device", "tpu"], 2, "--device"),
    ("studio-models-flag-missing", ["studio"], 2, "--models"),
    ("demo-motion-and-text", ["demo", "--motion", "--text", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-motion-and-policy", ["demo", "--motion", "--policy", "--out-dir", "{root}/demo"], 2, "not both"),
    ("demo-motion-steps-0", ["demo", "--motion", "--steps", "0", "--out-dir", "{root}/demo"], 2, "--steps"),
    ("demo-motion-aug-sigma", ["demo", "--motion", "--aug-sigma", "0.2", "--out-dir", "{root}/demo"], 2, "needs --cascade"),
    ("demo-motion-video-network", ["demo", "--motion", "--video-network", "space_time_unet", "--out-dir", "{root}/demo"], 2,
     "needs --video"),
    ("demo-motion-guidance-inf", ["demo", "--motion", "--guidance", "inf", "--out-dir", "{root}/demo"], 2, "--guidance"),
]


def _argv(argv, root):
    return [a.replace("{root}", str(root)) for a in argv]


def run_cli(argv, capsys):
    """(status, stdout, stderr) of ``difflab ARGV``; an exception escaping main fails the case
    (a user would have seen a traceback)."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own errors and --help
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_case(case, world, capsys):
    name, argv, status, phrase = case
    got, out, err = run_cli(_argv(argv, world), capsys)
    assert got == status, f"{name}: exit status {got}, expected {status}; stderr: {err.strip()[-500:]}"
    assert phrase.lower() in (err + out).lower(), f"{name}: {phrase!r} not in the message: {err.strip()[-500:]}"
    assert "Traceback" not in err
    assert len([line for line in err.strip().splitlines() if line.strip()]) <= 3 or "usage" in err, err
    assert not list(world.rglob("*.tmp")), f"{name} left temporary files: {list(world.rglob('*.tmp'))}"


# ----------------------------------------------------------------------------------------------
# Signals: a real process, interrupted while it works. (id, argv, signals sent, when to send them
# (a file that appears, or a phrase on stderr), exit status, phrase in the message)

LONG = ["train", "--preset", "tiny", "--device", "cpu", "--config", "{root}/long.json"]
SLOW_SAMPLE = ["sample", "--checkpoint", "{root}/run", "--num", "64", "--steps", "500", "--device", "cpu"]

SIGNAL_CASES = [
    ("train-sigint", [*LONG, "--out", "{root}/sig_int"], [signal.SIGINT], "log:{root}/sig_int", 130, "to resume"),
    ("train-sigterm", [*LONG, "--out", "{root}/sig_term"], [signal.SIGTERM], "log:{root}/sig_term", 143, "SIGTERM"),
    ("train-sigint-twice", [*LONG, "--out", "{root}/sig_twice"], [signal.SIGINT, signal.SIGINT], "log:{root}/sig_twice",
     130, "SIGINT"),
    ("sample-sigint", [*SLOW_SAMPLE, "--out", "{root}/sig.png"], [signal.SIGINT], "err:sampling", 130, "interrupted"),
    ("sample-sigterm", [*SLOW_SAMPLE, "--out", "{root}/sig.png"], [signal.SIGTERM], "err:sampling", 143, "SIGTERM"),
]


def _wait_for(proc, when: str, root, stderr_file) -> None:
    kind, _, what = when.partition(":")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if kind == "log" and (path := Path(what.replace("{root}", str(root))) / "log.jsonl").exists() and path.read_text():
            return
        if kind == "err" and what in stderr_file.read_text():
            return
        time.sleep(0.02)


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c[0] for c in SIGNAL_CASES])
def test_signal_case(case, world):
    name, argv, signals, when, status, phrase = case
    if name.startswith("train"):
        (world / "long.json").write_text(json.dumps({"train": {"steps": 100000, "batch_size": 8, "log_every": 1,
                                                               "checkpoint_every": 1000, "progress": False}}))
    err_file = world / f"{name}.stderr"
    with open(err_file, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "difflab.cli", *_argv(argv, world)], stdout=subprocess.DEVNULL,
                                stderr=err, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        _wait_for(proc, when, world, err_file)
        for sig in signals:
            proc.send_signal(sig)
        got = proc.wait(timeout=120)
    message = err_file.read_text()
    assert got == status, f"{name}: exit status {got}, expected {status}; stderr: {message[-500:]}"
    assert phrase.lower() in message.lower() and "Traceback" not in message, message[-800:]
    assert not list(world.rglob("*.tmp")) and not list(world.rglob("sig_*/train.lock"))
    if name == "train-sigint":  # the checkpoint holds the step the message names, and resuming is a real option
        step = int(re.search(r"after step (\d+)", message).group(1))
        assert load_checkpoint(world / "sig_int")[1]["step"] == step >= 1
    if name == "train-sigint-twice" and (world / "sig_twice" / "checkpoint.safetensors").exists():
        load_checkpoint(world / "sig_twice")  # whatever the second signal cut short, the newest checkpoint reads
    if name.startswith("sample"):
        assert not (world / "sig.png").exists()


# ----------------------------------------------------------------------------------------------
# API cases: (id, call(root) with root the fixture folder, the exception type(s) expected, phrase in
# the message). A user error is a ValueError or a FileNotFoundError raised where the bad value
# enters, naming it; never a TypeError, KeyError, IndexError or RuntimeError from deep inside.


def _zero(x, sigma, **cond):
    return torch.zeros_like(x)


def _unet(**config) -> Denoiser:
    torch.manual_seed(0)
    net = UNet(UNetConfig(model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), num_heads=1,
                          groups=8, **config))
    return Denoiser(net, VPDiscrete.from_name("cosine", 1000), "eps")


def _text_to_image(prompts, **kwargs):
    text = TinyTextEncoder(TinyTextConfig(vocab=("<pad>", "<unk>", "a", "cat"), max_length=4, width=8, layers=1, heads=2))
    return text_to_image(_unet(context_dim=8), text, None, prompts, height=8, width=8, steps=2, progress=False,
                         output_type="pt", **kwargs)


def _controlnet(control, controls=1):
    """One ControlNet on a tiny U-Net, called directly or (``controls=2``) through a ControlledUNet."""
    config = UNetSDConfig(block_out_channels=(8, 16), layers_per_block=1, down_attention=(True, False),
                          up_attention=(False, True), num_heads=(2, 2), cross_attention_dim=8, norm_num_groups=4)
    controlnet = ControlNet(ControlNetConfig(config, 3, (8,)))
    x, t, context = torch.zeros(1, 4, 8, 8), torch.tensor([10.0]), torch.zeros(1, 3, 8)
    if controls == 1:
        return controlnet(x, t, control, context)
    return ControlledUNet(UNetSD(config), controlnet)(x, t, context, control=control)


def _motion():
    torch.manual_seed(0)
    return MotionUNet(MOTION_PRESETS["tiny"])


class _Flat(torch.nn.Module):
    """A feature extractor for the eval cases: the pixels themselves."""

    name = "flat"

    def forward(self, images):
        return images.flatten(1)


GRID = torch.tensor([1.0, 0.5, 0.0])
API_CASES = [
    # samplers: the grid, the sample, the name
    ("sampler-increasing-sigmas", lambda r: sample_euler(_zero, torch.zeros(1, 2), [0.5, 1.0, 0.0]), ValueError, "strictly decreasing"),
    ("sampler-nan-sigma", lambda r: sample_euler(_zero, torch.zeros(1, 2), [1.0, math.nan, 0.0]), ValueError, "finite"),
    ("sampler-negative-sigma", lambda r: sample_euler(_zero, torch.zeros(1, 2), [1.0, -0.5]), ValueError, "non-negative"),
    ("sampler-2d-grid", lambda r: sample_euler(_zero, torch.zeros(1, 2), torch.ones(2, 2)), ValueError, "1-D"),
    ("sampler-scalar-x", lambda r: sample_euler(_zero, torch.tensor(1.0), GRID), ValueError, "x must be"),
    ("sampler-x-not-a-tensor", lambda r: get_sampler("ddim")(_zero, [[1.0, 2.0]], GRID), ValueError, "x must be"),
    ("sampler-unknown", lambda r: get_sampler("eulr"), ValueError, "euler"),
    # pipelines: SampleOptions and the keywords that become them
    ("options-steps-0", lambda r: SampleOptions(steps=0), ConfigError, "steps=0"),
    ("options-sampler-unknown", lambda r: SampleOptions(sampler="nope"), ConfigError, "sampler='nope'"),
    ("options-guidance-nan", lambda r: SampleOptions(guidance_scale=math.nan), ConfigError, "guidance_scale"),
    ("options-from-dict-typo", lambda r: SampleOptions.from_dict({"stpes": 3}), ConfigError, "stpes"),
    ("options-sampler-keyword-typo", lambda r: SampleOptions(sampler="euler", sampler_kwargs={"s_chrun": 1.0}),
     ConfigError, "s_chrun"),
    ("generate-keyword-typo", lambda r: generate(_unet(num_classes=3), [1], shape=(1, 8, 8), steps=2, stpes=3, progress=False),
     ConfigError, "stpes"),
    ("generate-eta-for-euler", lambda r: generate(_unet(num_classes=3), [1], shape=(1, 8, 8), sampler="euler", eta=0.5,
                                                  progress=False), ConfigError, "eta"),
    ("generate-guidance-nan", lambda r: generate(_unet(num_classes=3), [1], shape=(1, 8, 8), guidance_scale=math.nan),
     ConfigError, "guidance_scale"),
    ("generate-label-out-of-range", lambda r: generate(_unet(num_classes=3), [5], shape=(1, 8, 8)), ValueError, "[0, 2]"),
    ("generate-increasing-grid", lambda r: generate(_unet(), num_samples=1, shape=(1, 8, 8), grid=torch.tensor([0.5, 1.0, 0.0])),
     ValueError, "strictly decreasing"),
    # text to image: prompts
    ("text-prompt-not-a-string", lambda r: _text_to_image(7), ValueError, "prompts"),
    ("text-prompt-list-of-numbers", lambda r: _text_to_image([1, 2]), ValueError, "prompts"),
    ("text-prompt-dict", lambda r: _text_to_image({"a": 1}), ValueError, "prompts"),
    ("text-prompt-empty-list", lambda r: _text_to_image([]), ValueError, "empty"),
    ("text-negative-not-a-string", lambda r: _text_to_image(["a cat"], negative_prompts=3), ValueError, "negative_prompts"),
    ("text-negatives-count", lambda r: _text_to_image(["a", "cat"], negative_prompts=["a", "a", "a"]), ValueError,
     "negative_prompts has 3"),
    ("text-prompt-too-long", lambda r: _text_to_image("a a a a a a"), ValueError, "longer"),
    ("text-added-cond-rows", lambda r: _text_to_image(["a", "cat"], added_cond={"time_ids": torch.zeros(3, 6)}), ValueError,
     "added_cond['time_ids']"),
    ("text-negative-added-cond-alone", lambda r: _text_to_image(["a"], negative_added_cond={"time_ids": torch.zeros(1, 6)}),
     ValueError, "without added_cond"),
    # ControlNet: the control image
    ("controlnet-control-wrong-size", lambda r: _controlnet(torch.zeros(1, 3, 16, 16)), ValueError, "control must be"),
    ("controlnet-control-wrong-channels", lambda r: _controlnet(torch.zeros(1, 1, 8, 8)), ValueError, "control must be"),
    ("controlnet-control-not-a-tensor", lambda r: _controlnet(np.zeros((1, 3, 8, 8), np.float32)), ValueError, "control must be"),
    ("controlnet-two-controls-for-one", lambda r: _controlnet([torch.zeros(1, 3, 8, 8)] * 2, controls=2), ValueError,
     "2 entries for 1"),
    # LoRA files
    ("lora-keys-match-nothing", lambda r: load_lora_weights(_unet().net, {"foo.lora_A.weight": torch.zeros(2, 4),
                                                                       "foo.lora_B.weight": torch.zeros(4, 2)}),
     ValueError, "match no"),
    ("lora-wrong-shapes", lambda r: load_lora_weights(_unet().net, {"time_embed.net.0.lora_A.weight": torch.zeros(2, 999),
                                                                 "time_embed.net.0.lora_B.weight": torch.zeros(32, 2)},
                                                      prefix=""), ValueError, "does not fit"),
    ("lora-unknown-layout", lambda r: load_lora_weights(_unet().net, {"hello": torch.zeros(2)}), ValueError, "LoRA format"),
    ("lora-not-safetensors", lambda r: load_lora_weights(_unet().net, r / "notes.txt"), ValueError, "safetensors"),
    ("lora-garbage-safetensors", lambda r: load_lora_weights(_unet().net, r / "garbage.safetensors"), ValueError, "garbage.safetensors"),
    ("lora-missing", lambda r: load_lora_weights(_unet().net, r / "nope.safetensors"), FileNotFoundError, "nope.safetensors"),
    ("lora-training-checkpoint", lambda r: load_lora(r / "run" / "checkpoint.safetensors", _unet().net), ValueError, "not a LoRA"),
    # checkpoints
    ("load-checkpoint-nan", lambda r: load_checkpoint(r / "nan.safetensors"), NonFiniteError, "not finite"),
    ("load-checkpoint-garbage", lambda r: load_checkpoint(r / "garbage.safetensors"), ValueError, "safetensors"),
    ("load-denoiser-weights-unknown", lambda r: load_denoiser(r / "run", weights="best"), ValueError, "weights='best'"),
    ("load-denoiser-shape-mismatch", lambda r: load_denoiser(r / "shape.safetensors", weights="model"), ValueError, "shape"),
    # configs and specs
    ("train-config-unknown-key", lambda r: TrainConfig.from_dict({"lerning_rate": 1e-3}), ConfigError, "lerning_rate"),
    ("train-config-lr-string", lambda r: TrainConfig(lr="1e-3"), ValueError, "lr"),
    ("train-config-lr-nan", lambda r: TrainConfig(lr=math.nan), ValueError, "lr"),
    ("train-config-fp8-fp16", lambda r: TrainConfig(fp8=True, precision="fp16"), ValueError, "not 'fp16'"),
    ("train-config-fp8-fsdp", lambda r: TrainConfig(fp8=True, parallel="fsdp"), ValueError, "parallel='fsdp'"),
    ("fp8-history-len-0", lambda r: swap_fp8_training(torch.nn.Linear(2, 2), history_len=0), ValueError, "history_len"),
    ("unet-config-typo", lambda r: UNetConfig.from_dict({"model_chanels": 8}), ConfigError, "model_chanels"),
    ("spec-unknown-kind", lambda r: build_denoiser({"network": {"kind": "transformer", "config": {}}}), ConfigError, "transformer"),
    ("spec-model-channels-0", lambda r: build_denoiser({"unet": {"model_channels": 0}}), ValueError, "model_channels"),
    ("spec-in-channels-0", lambda r: build_denoiser({"unet": {"in_channels": 0}}), ValueError, "in_channels"),
    ("spec-heads-do-not-divide", lambda r: build_denoiser({"unet": {"model_channels": 16, "num_heads": 3}}), ValueError, "num_heads"),
    ("spec-schedule-typo", lambda r: build_denoiser({"unet": {}, "diffusion": {"frame": "vp_discrete", "schedule": "cosin"}}),
     ValueError, "cosin"),
    # data folders
    ("image-folder-missing", lambda r: load_image_folder(r / "nowhere", 8), FileNotFoundError, "does not exist"),
    ("image-folder-is-a-file", lambda r: load_image_folder(r / "notes.txt", 8), ValueError, "not a folder"),
    ("image-folder-empty", lambda r: load_image_folder(r / "empty", 8), ValueError, "no images"),
    # evaluation
    ("fid-one-image", lambda r: fid(torch.zeros(1, 4), torch.randn(5, 4)), ValueError, "N >= 2"),
    ("evaluate-too-few-images", lambda r: evaluate(torch.zeros(1, 1, 8, 8), r / "images", _Flat(), ["fid"], progress=False),
     ValueError, "N >= 2"),
    ("precision-k-too-large", lambda r: precision_recall(torch.randn(3, 4), torch.randn(3, 4), k=3), ValueError, "k=3"),
    ("memorization-shapes-differ", lambda r: memorization(torch.zeros(3, 1, 8, 8), torch.zeros(5, 1, 4, 4)), ValueError,
     "must match"),
    ("memorization-neighbours-too-many", lambda r: memorization(torch.zeros(3, 4), torch.randn(5, 4), neighbours=5),
     ValueError, "neighbours=5"),
    ("memorization-delta-0", lambda r: memorization(torch.zeros(3, 4), torch.randn(5, 4), neighbours=2, delta=0), ValueError, "delta"),
    ("memorization-not-a-tensor", lambda r: memorization([[0.0]], torch.randn(5, 4)), ValueError, "generated"),
    ("provenance-source-unknown", lambda r: provenance({"x": torch.zeros(2)}, source=3), ValueError, "source"),
    # guidance
    ("cfg-scale-nan", lambda r: ClassifierFreeGuidance(_zero, math.nan, uncond={}), ValueError, "scale"),
    ("cfg-scale-inf", lambda r: ClassifierFreeGuidance(_zero, math.inf, uncond={}), ValueError, "scale"),
    # Stable Diffusion 3 (an index alone is enough to be refused or to fail on the first missing part)
    ("sd3-folder-index-only", lambda r: load_sd3_folder(r / "sd3"), FileNotFoundError, "scheduler"),
    ("sd3-folder-not-a-pipeline", lambda r: load_sd3_folder(r / "run"), FileNotFoundError, "model_index.json"),
    ("sd3-folder-to-sd-loader", lambda r: load_diffusers_folder(r / "sd3"), ValueError, "load_sd3_folder"),
    ("mmdit-qk-norm-unknown", lambda r: MMDiTConfig(qk_norm="l2"), ValueError, "qk_norm"),
    ("mmdit-dual-layer-out-of-range", lambda r: MMDiTConfig(num_layers=2, dual_attention_layers=(5,)), ValueError, "dual_attention_layers"),
    ("sd3-grid-shift-0", lambda r: sd3_sigmas(4, 0.0), ValueError, "shift"),
    # the mixture-of-experts DiT
    ("dit-moe-experts-negative", lambda r: DiTConfig(moe_experts=-1), ValueError, "moe_experts=-1"),
    ("dit-moe-capacity-0", lambda r: DiTConfig(moe_experts=4, moe_capacity_factor=0.0), ValueError, "moe_capacity_factor"),
    ("dit-moe-saved-as-diffusers", lambda r: save_diffusers_dit(DiT(DiTConfig(hidden_size=16, depth=1, num_classes=2, moe_experts=2,
                                                                              frequency_shift=1)), r / "moe_export"),
     ValueError, "mixture-of-experts DiT"),
    # video networks: AnimateDiff motion modules
    ("motion-4d-input", lambda r: _motion()(torch.zeros(1, 4, 8, 8), torch.ones(1)), ValueError, "x must be a batch of clips"),
    ("motion-frames-above-max", lambda r: _motion()(torch.zeros(1, 4, 17, 8, 8), torch.ones(1)), ValueError, "max_frames = 16"),
    ("motion-context-per-frame", lambda r: _motion()(torch.zeros(1, 4, 2, 8, 8), torch.ones(1), context=torch.zeros(2, 1, 32)),
     ValueError, "one row per clip"),
    ("motion-config-frames-above-max", lambda r: MotionUNetConfig(max_frames=8, num_frames=16), ValueError, "num_frames=16"),
    ("motion-config-image-kind", lambda r: MotionUNetConfig(image_kind="dit"), ValueError, "image_kind='dit'"),
    ("motion-adapter-missing", lambda r: load_motion_adapter(r / "nowhere", UNetSD(UNetSDConfig.from_dict(MOTION_PRESETS["tiny"].image))),
     FileNotFoundError, "MotionAdapter"),
    ("unet-motion-folder-is-a-run", lambda r: load_unet_motion_model(r / "run"), FileNotFoundError, "config.json"),
    ("motion-directions-0", lambda r: MotionUNetConfig(max_frames=16, num_frames=8, num_directions=0), ValueError, "num_directions=0"),
    ("motion-time-embedding-not-bool", lambda r: MotionUNetConfig(max_frames=16, num_frames=8, time_embedding=1), ValueError,
     "time_embedding=1 must be a bool"),
    ("motion-direction-label-out-of-range", lambda r: MotionUNet(dataclasses.replace(MOTION_PRESETS["tiny"], num_directions=4))(
        torch.zeros(1, 4, 2, 8, 8), torch.ones(1), direction_labels=torch.tensor([5])), ValueError, "direction_labels must be"),
    ("motion-direction-labels-without-directions", lambda r: _motion()(torch.zeros(1, 4, 2, 8, 8), torch.ones(1),
                                                                      direction_labels=torch.tensor([0])), ValueError, "take none"),
    # policies (issue 20): the Detour environment, the temporal U-Net, the policy pipeline
    ("detour-no-seeds", lambda r: DetourEnv([]), ValueError, "seeds"),
    ("detour-action-shape", lambda r: DetourEnv([0]).step(torch.zeros(2, 2)), ValueError, "action"),
    ("detour-action-nan", lambda r: DetourEnv([0]).step(torch.full((1, 2), math.nan)), ValueError, "finite"),
    ("detour-config-speed-0", lambda r: DetourConfig(max_speed=0.0), ValueError, "max_speed"),
    ("detour-execute-0", lambda r: run_episodes(lambda o, e, k: torch.zeros(len(e), 4, 2), [0], execute=0), ValueError, "execute"),
    ("detour-policy-short-chunk", lambda r: run_episodes(lambda o, e, k: torch.zeros(len(e), 2, 2), [0], execute=4),
     ValueError, "chunks"),
    ("temporal-unet-horizon", lambda r: TemporalUNetConfig(horizon=6, channel_mult=(1, 2, 2)), ValueError, "horizon"),
    ("temporal-unet-even-kernel", lambda r: TemporalUNetConfig(kernel_size=4), ValueError, "kernel_size"),
    ("temporal-unet-missing-obs", lambda r: TemporalUNet(TemporalUNetConfig(cond_dim=8, model_channels=4, groups=2))(
        torch.zeros(1, 16, 2), torch.zeros(1)), ValueError, "obs="),
    ("policy-chunks-steps-0", lambda r: sample_action_chunks(_zero, torch.zeros(1, 2, 4), [0], shape=(16, 2), steps=0),
     ValueError, "steps"),
    ("policy-chunks-seeds-mismatch", lambda r: sample_action_chunks(_zero, torch.zeros(2, 2, 4), [0], shape=(16, 2)),
     ValueError, "one row per seed"),
    # studio: what the page can send (difflab/studio), refused before anything is queued
    ("studio-model-path-traversal", lambda r: resolve_model(r, "../catalogue"), ValueError, "never by a path"),
    ("studio-model-not-served", lambda r: resolve_model(r, "notes.txt"), ValueError, "not in the models folder"),
    ("studio-steps-0", lambda r: check_request({"steps": 0}, resolve_model(r, "run"), 2**20), ValueError, "steps=0"),
    ("studio-steps-10000", lambda r: check_request({"steps": 10000}, resolve_model(r, "run"), 2**20), ValueError, "1 to 1000"),
    ("studio-sampler-unknown", lambda r: check_request({"sampler": "nope"}, resolve_model(r, "run"), 2**20), ValueError,
     "sampler 'nope' is unknown"),
    ("studio-upload-not-an-image", lambda r: decode_image("aGVsbG8=", "image", 2**20), ValueError, "not an image"),
    ("studio-upload-over-the-limit", lambda r: decode_image("A" * 4000, "image", 1000), ValueError, "too large"),
    ("studio-png-without-parameters", lambda r: parse_parameters("just a prompt"), ValueError, "no generation parameters"),
    # motion diffusion (issue 20): stick figures, MDM, the motion pipeline and judge
    ("stick-figures-none", lambda r: make_motions(0), ValueError, "n_per_action"),
    ("mdm-config-heads", lambda r: MDMConfig(d_model=30, heads=4), ValueError, "heads=4"),
    ("mdm-too-many-frames", lambda r: _mdm().net(torch.zeros(1, 40, 17, 3), torch.zeros(1)), ValueError, "frames <= 32"),
    ("mdm-label-out-of-range", lambda r: _mdm().net(torch.zeros(1, 32, 17, 3), torch.zeros(1), class_labels=torch.tensor([9])),
     ValueError, "class_labels"),
    ("motion-key-frame-out-of-range", lambda r: keyframe_mask((32, 17, 3), [40]), ValueError, "key_frames"),
    ("motion-joint-out-of-range", lambda r: joint_mask((32, 17, 3), [17]), ValueError, "given_joints"),
    ("motion-sample-unknown-action", lambda r: sample_motions(_mdm(), torch.tensor([8]), [0], shape=(32, 17, 3)),
     ValueError, "labels"),
    ("motion-sample-steps-0", lambda r: sample_motions(_mdm(), torch.tensor([1]), [0], shape=(32, 17, 3), steps=0),
     ValueError, "steps"),
    ("motion-edit-mask-shape", lambda r: edit_motions(_mdm(), torch.zeros(1, 32, 17, 3), torch.ones(1, 16, 17, 3), [0], [0]),
     ValueError, "mask"),
    ("motion-metrics-not-motions", lambda r: bone_length_drift(torch.zeros(2, 32, 3)), ValueError, "motions"),
    # 3-D (issue 21): shapes, the point transformer, point metrics, PLY, the renderer, score distillation
    ("shapes3d-split", lambda r: load_shapes3d("val"), ValueError, "split"),
    ("shapes3d-label", lambda r: make_shape(10, 8, 0), ValueError, "label"),
    ("shapes3d-num-points-0", lambda r: load_shapes3d(num_points=0), ValueError, "num_points"),
    ("point-transformer-heads", lambda r: PointTransformerConfig(width=30, num_heads=4), ValueError, "num_heads"),
    ("point-transformer-knn-negative", lambda r: PointTransformerConfig(knn=-1), ValueError, "knn=-1"),
    ("point-transformer-local-name", lambda r: PointTransformerConfig(knn=8, local="pvcnn"), ValueError, "edgeconv"),
    ("point-transformer-local-blocks", lambda r: PointTransformerConfig(depth=2, knn=8, local_blocks=3), ValueError,
     "local_blocks"),
    ("point-transformer-image-input", lambda r: PointTransformer(PointTransformerConfig(width=8, depth=1, num_heads=2))(
        torch.zeros(1, 1, 8, 8), torch.zeros(1)), ValueError, "(B, N, 3)"),
    ("point-metrics-not-clouds", lambda r: shape_set_metrics(torch.zeros(4, 3), torch.zeros(4, 3)), ValueError, "(B, N, 3)"),
    ("point-metrics-one-cloud", lambda r: shape_set_metrics(torch.zeros(1, 4, 3), torch.zeros(3, 4, 3)), ValueError, "at least 2"),
    ("point-metrics-distance", lambda r: pairwise(torch.zeros(2, 4, 3), torch.zeros(2, 4, 3), "hausdorff"), ValueError, "chamfer"),
    ("emd-sizes-differ", lambda r: emd(torch.zeros(4, 3), torch.zeros(5, 3)), ValueError, "same size"),
    ("ply-not-points", lambda r: write_ply(r / "x.ply", torch.zeros(3, 4)), ValueError, "(N, 3)"),
    ("ply-not-a-ply", lambda r: read_ply(r / "notes.txt"), ValueError, "not a PLY"),
    ("voxel-resolution-1", lambda r: VoxelGrid(1), ValueError, "resolution"),
    ("orbit-rays-mismatch", lambda r: orbit_rays([0.0, 90.0], [0.0], 4), ValueError, "one angle per camera"),
    ("sds-method", lambda r: SDSConfig(method="dds"), ValueError, "'sds' or 'vsd'"),
    ("sds-t-range", lambda r: SDSConfig(t_min=0.5, t_max=0.4), ValueError, "t_min"),
    ("sds-no-views", lambda r: distill_views(_zero, [], SDSConfig(steps=1)), ValueError, "views"),
    ("points-num-points-0", lambda r: generate_points(_zero, [0], num_points=0), ValueError, "num_points"),
    ("diffwave-class-prior-unconditional", lambda r: DiffWaveConfig(class_prior=True), ValueError, "class_prior=True needs"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_case(case, world):
    name, call, expected, phrase = case
    with pytest.raises(Exception) as info:
        call(world)
    error = info.value
    assert isinstance(error, (ValueError, FileNotFoundError)), f"{name}: a {type(error).__name__} is not a user error: {error}"
    assert isinstance(error, expected), f"{name}: expected {expected}, got {type(error).__name__}: {error}"
    assert phrase.lower() in str(error).lower(), f"{name}: {phrase!r} not in the message: {error}"


def test_the_catalogue_is_large_enough():
    assert len(CLI_CASES) >= 60
    assert len(API_CASES) >= 15
    assert len(CLI_CASES) + len(API_CASES) + len(SIGNAL_CASES) >= 100
    ids = [c[0] for c in CLI_CASES + API_CASES + SIGNAL_CASES]
    assert len(set(ids)) == len(ids)


def _mdm():
    return build_denoiser(make_spec("mdm", MDMConfig(d_model=8, heads=2, depth=1),
                                    {"frame": "vp_discrete", "schedule": "cosine", "T": 100, "prediction": "x0"}), seed=0).eval()
