"""LoRA (Hu et al. 2021, eq. 3): injection by name pattern, merging, training only the adapters,
files, and parity with peft / diffusers for the PEFT and kohya formats, on tiny models."""
import copy
import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from difflab.adapters import (LoRAConv2d, LoRALinear, find_modules, inject_lora, list_adapters, load_lora, load_lora_weights,
                              lora_parameters, lora_state_dict, mark_only_lora_trainable, merge_lora, remove_lora, save_lora,
                              set_adapter_weights, unmerge_lora)
from difflab.io import read_metadata

F64 = torch.float64


class Tiny(nn.Module):
    """Linear and Conv2d layers of every kind LoRA wraps: 3x3, strided, dilated, 1x1, with and without bias."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        self.proj = nn.Conv2d(8, 8, 1)
        self.block = nn.ModuleDict({"lin": nn.Linear(8, 8), "out": nn.Linear(8, 4, bias=False)})

    def forward(self, x):
        h = torch.tanh(self.conv_in(x))
        h = self.proj(torch.tanh(self.down(h))).mean((2, 3))
        return self.block["out"](torch.tanh(self.block["lin"](h)))


def tiny(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return Tiny().to(dtype).eval()


def randomize_b(model, std=0.3, seed=1):
    """B starts at zero (so the adapter does nothing): give every B a random value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))


def x_tiny(dtype=torch.float32, seed=2):
    return torch.randn(3, 3, 9, 9, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def base_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


# ----------------------------------------------------------------------------------------------
# Eq. 3, layer by layer


def test_layers_compute_eq3():
    """h = W0 x + (alpha / r) B A x, by hand in float64, for a Linear and a strided dilated Conv2d."""
    torch.manual_seed(0)
    lin = LoRALinear(nn.Linear(6, 5).double())
    lin.add_adapter("a", rank=3, alpha=7.0)
    nn.init.normal_(lin.lora_B["a"].weight)
    x = torch.randn(4, 6, dtype=F64)
    A, B = lin.lora_A["a"].weight, lin.lora_B["a"].weight
    want = x @ lin.weight.T + lin.bias + (7.0 / 3) * x @ A.T @ B.T
    torch.testing.assert_close(lin(x), want, atol=1e-12, rtol=0)

    conv = LoRAConv2d(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2).double())
    conv.add_adapter("a", rank=2, alpha=5.0)
    nn.init.normal_(conv.lora_B["a"].weight)
    x = torch.randn(2, 4, 9, 9, dtype=F64)
    A, B = conv.lora_A["a"].weight, conv.lora_B["a"].weight
    assert A.shape == (2, 4, 3, 3) and B.shape == (6, 2, 1, 1)
    two_convs = F.conv2d(x, conv.weight, conv.bias, 2, 1, 2) + 2.5 * F.conv2d(F.conv2d(x, A, None, 2, 1, 2), B)
    one_kernel = F.conv2d(x, conv.weight + 2.5 * torch.einsum("or,rihw->oihw", B[:, :, 0, 0], A), conv.bias, 2, 1, 2)
    torch.testing.assert_close(conv(x), two_convs, atol=1e-12, rtol=0)
    torch.testing.assert_close(conv(x), one_kernel, atol=1e-12, rtol=0)


def test_init_changes_nothing_and_keeps_base_keys():
    base = tiny()
    model = copy.deepcopy(base)
    names = inject_lora(model, "*", rank=3, alpha=6.0, dropout=0.2)
    assert names == ["conv_in", "down", "proj", "block.lin", "block.out"]
    assert isinstance(model.block["lin"], nn.Linear) and isinstance(model.down, nn.Conv2d)  # wrappers are the base types
    x = x_tiny()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        model.train()  # dropout acts on the adapter's input only, and B = 0
        assert torch.equal(model(x), base(x))
    # the base weights keep their keys; each adapter adds A and B
    state = model.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(state[k], v)
    assert set(state) - set(base.state_dict()) == {f"{m}.lora_{ab}.default.weight" for m in names for ab in "AB"}
    for m in names:  # Kaiming-uniform A (a = sqrt 5): |A| <= 1 / sqrt(fan_in); B zero
        A = state[f"{m}.lora_A.default.weight"]
        assert 0 < A.abs().max() <= 1 / math.sqrt(A[0].numel()) and not state[f"{m}.lora_B.default.weight"].any()


def test_dropout_is_on_the_adapter_input():
    model = tiny()
    inject_lora(model, "block.*", rank=2, dropout=0.5)
    randomize_b(model)
    x = x_tiny()
    with torch.no_grad():
        evaluated = model(x)
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        b = model(x)
        model.eval()
        assert torch.equal(model(x), evaluated)
    assert (a - b).abs().max() > 1e-3  # dropout is active in training
    no_dropout = tiny()
    inject_lora(no_dropout, "block.*", rank=2)
    no_dropout.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.equal(no_dropout(x), evaluated)  # ... and the identity in eval


# ----------------------------------------------------------------------------------------------
# Several adapters, merging


def test_merge_unmerge_two_adapters_with_weights():
    base = tiny()
    model = copy.deepcopy(base)
    inject_lora(model, ["conv_in", "down", "block.lin"], rank=2, alpha=3.0, name="a")
    inject_lora(model, "re:.*(proj|out)|conv_in", rank=4, alpha=2.0, name="b")
    assert list_adapters(model) == {"a": ["conv_in", "down", "block.lin"], "b": ["conv_in", "proj", "block.out"]}
    randomize_b(model)
    set_adapter_weights(model, {"a": 1.0, "b": 0.5})
    x = x_tiny()
    with torch.no_grad():
        unmerged = model(x)
        set_adapter_weights(model, {"b": 0.0})
        only_a = model(x)
        set_adapter_weights(model, {"b": 0.5})
        assert (unmerged - only_a).abs().max() > 1e-2 and (unmerged - base(x)).abs().max() > 1e-2

        merge_lora(model)
        merged_weights = {k: v.clone() for k, v in base_state(model).items()}
        merged = model(x)
        err = (merged - unmerged).abs().max().item()
        assert err < 1e-5, err
        merge_lora(model)  # merging twice is a no-op
        assert all(torch.equal(v, merged_weights[k]) for k, v in base_state(model).items())
        with pytest.raises(RuntimeError, match="unmerge"):
            set_adapter_weights(model, {"b": 1.0})

        unmerge_lora(model)
        for k, v in base.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)

        merge_lora(model, "a")  # one adapter only: still the same function
        assert model.conv_in.merged.keys() == {"a"}
        torch.testing.assert_close(model(x), unmerged, atol=1e-5, rtol=0)
        unmerge_lora(model)
        set_adapter_weights(model, {"b": 0.0})
        torch.testing.assert_close(model(x), only_a, atol=1e-6, rtol=0)


def test_remove_lora_restores_plain_layers():
    base = tiny()
    model = copy.deepcopy(base)
    inject_lora(model, "*", rank=2, name="a")
    inject_lora(model, "block.lin", rank=2, name="b")
    randomize_b(model)
    x = x_tiny()
    with torch.no_grad():
        with_both = model(x)
        merge_lora(model)
        assert remove_lora(model, "a") == ["conv_in", "down", "proj", "block.out"]  # unmerges a, then drops it
        assert type(model.conv_in) is nn.Conv2d and type(model.block["lin"]) is LoRALinear
        assert list_adapters(model) == {"b": ["block.lin"]}
        torch.testing.assert_close(model.conv_in.weight, base.conv_in.weight, atol=1e-6, rtol=0)

        merged = copy.deepcopy(model)
        remove_lora(merged, merge=True)  # "merge and unload": b stays in the weights
        assert type(merged.block["lin"]) is nn.Linear and set(merged.state_dict()) == set(base.state_dict())
        assert (merged.block["lin"].weight - base.block["lin"].weight).abs().max() > 1e-3

        remove_lora(model)
        assert set(model.state_dict()) == set(base.state_dict())
        torch.testing.assert_close(model(x), base(x), atol=1e-6, rtol=0)
    assert (with_both - base(x)).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------
# Training only the adapters


def test_finetune_changes_only_the_adapters(tmp_path):
    """difflab.train.train on 8x8 digits with the tiny U-Net: the base weights stay bit-identical."""
    from difflab.core import Denoiser, VPDiscrete
    from difflab.data.digits import load_digits
    from difflab.nn.unet import PRESETS, UNet
    from difflab.train import TrainConfig, train

    torch.manual_seed(0)
    net = UNet(PRESETS["tiny"])
    with torch.no_grad():  # a "pretrained" net: no zero-initialized layer blocks the gradients
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    names = inject_lora(net, ["re:.*\\.(qkv|proj)", "input_conv", "out.2", "emb_layers.1"], rank=2, alpha=4.0)
    assert {type(net.get_submodule(n)) for n in names} == {LoRALinear, LoRAConv2d}
    n_trainable = mark_only_lora_trainable(net)
    assert n_trainable == sum(p.numel() for p in lora_parameters(net)) > 0
    before = base_state(net)
    adapters_before = {k: v.clone() for k, v in net.state_dict().items() if ".lora_" in k}

    images, _ = load_digits(split="train")
    config = TrainConfig(steps=3, batch_size=8, lr=1e-2, ema_decay=0.9, progress=False, log_every=0, checkpoint_every=0)
    train(Denoiser(net, VPDiscrete.from_name("linear", 100)), images[:64], config, tmp_path)

    after = net.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert all(p.grad is None for n, p in net.named_parameters() if ".lora_" not in n)
    changed = {k for k, v in adapters_before.items() if not torch.equal(after[k], v)}
    assert changed == set(adapters_before)  # every A and B moved


# ----------------------------------------------------------------------------------------------
# Files


def test_save_load_roundtrip(tmp_path):
    base = tiny()
    model = copy.deepcopy(base)
    inject_lora(model, ["conv_in", "block.*"], rank=3, alpha=5.0, dropout=0.1, name="style")
    randomize_b(model)
    path = save_lora(tmp_path / "style.safetensors", model, "style")
    meta = read_metadata(path)
    assert (meta["kind"], meta["name"], meta["rank"], meta["alpha"], meta["targets"]) == ("difflab.lora", "style", 3, 5.0, ["conv_in", "block.*"])
    assert set(meta["modules"]) == {"conv_in", "block.lin", "block.out"}

    loaded = copy.deepcopy(base)
    assert load_lora(path, loaded) == ["conv_in", "block.lin", "block.out"]
    assert {k: v for k, v in lora_state_dict(loaded, "style").items()}.keys() == lora_state_dict(model, "style").keys()
    for k, v in lora_state_dict(model, "style").items():
        assert torch.equal(lora_state_dict(loaded, "style")[k], v)
    spec = loaded.block["lin"].lora["style"]
    assert (spec.rank, spec.alpha, spec.dropout, spec.targets) == (3, 5.0, 0.1, ("conv_in", "block.*"))
    x = x_tiny()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        # the file holds only the adapter: loaded under another name, with a weight, beside the first
        load_lora_weights(loaded, path, name="again", weight=0.5)
        set_adapter_weights(loaded, {"style": 0.5})
        torch.testing.assert_close(loaded(x), model(x), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------
# Parity with peft and diffusers

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None,
                                reason="peft (test extra) is the reference the PEFT format is checked against")


@needs_peft
def test_peft_parity_plain_module(tmp_path):
    """get_peft_model on Linear / Conv2d layers (rank and alpha patterns), then difflab loads its state dict."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    base = tiny()
    config = LoraConfig(r=4, lora_alpha=6, target_modules=["conv_in", "proj", "lin", "out"],
                        rank_pattern={"lin": 2}, alpha_pattern={"out": 3, "proj": 10})
    ref = get_peft_model(copy.deepcopy(base), config)
    randomize_b(ref)
    x = x_tiny()
    with torch.no_grad():
        want = ref(x)
        state = get_peft_model_state_dict(ref)
        assert (want - base(x)).abs().max() > 1e-2

        model = copy.deepcopy(base)
        load_lora_weights(model, state, format="peft", prefix="", config=ref.peft_config["default"].to_dict())
        err = (model(x) - want).abs().max().item()
        assert err < 1e-5, err
        assert model.block["lin"].lora["default"].rank == 2 and model.proj.lora["default"].alpha == 10

        # PEFT's save_pretrained directory: adapter_model.safetensors + adapter_config.json, format detected
        ref.save_pretrained(tmp_path / "peft")
        from_dir = copy.deepcopy(base)
        load_lora_weights(from_dir, tmp_path / "peft")
        torch.testing.assert_close(from_dir(x), want, atol=1e-5, rtol=0)

        # without a config, alpha = r (scale 1, the PEFT/diffusers convention) and the outputs differ
        no_config = copy.deepcopy(base)
        load_lora_weights(no_config, state, prefix="")
        assert no_config.conv_in.lora["default"].alpha == 4 and (no_config(x) - want).abs().max() > 1e-3

    # rsLoRA scales by alpha / sqrt(r)
    rs = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=6, target_modules=["lin"], use_rslora=True))
    randomize_b(rs)
    model = copy.deepcopy(base)
    load_lora_weights(model, get_peft_model_state_dict(rs), prefix="", config=rs.peft_config["default"].to_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), rs(x), atol=1e-5, rtol=0)


SD1_TINY = dict(block_out_channels=(16, 32), layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16, attention_head_dim=4,
                norm_num_groups=8, sample_size=8)
SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1", "conv2", "time_emb_proj", "conv_in"]


@pytest.fixture(scope="module")
def sd_lora():
    """A tiny diffusers UNet2DConditionModel, the same U-Net with a peft LoRA (add_adapter), its outputs."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    base = UNet2DConditionModel(**SD1_TINY).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(base)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=SD_TARGETS, alpha_pattern={"attn2.to_k": 2, "conv1": 12})
    ref.add_adapter(config)
    randomize_b(ref, std=0.1)
    g = torch.Generator().manual_seed(3)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10.0, 637.0]), torch.randn(2, 5, 16, generator=g))
    with torch.no_grad():
        want = ref(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
        plain = base(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    assert (want - plain).abs().max() > 1e-2
    return base, ref, config, inputs, want


def difflab_unet(base):
    from difflab.nn.unet_sd import UNetSD, UNetSDConfig

    net = UNetSD(UNetSDConfig.from_diffusers_config(dict(base.config))).eval()
    net.load_state_dict(base.state_dict())
    return net


def run(net, inputs):
    with torch.no_grad():
        return net(inputs[0], inputs[1], context=inputs[2])


@needs_peft
def test_diffusers_file_parity(sd_lora, tmp_path):
    """A LoRA saved by diffusers (unet. prefix, LoraConfig in the safetensors header) applied to difflab's
    UNetSD gives diffusers + peft's outputs."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from peft import get_peft_model_state_dict

    base, ref, config, inputs, want = sd_lora
    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(ref),
                                                     unet_lora_adapter_metadata=config.to_dict())
    net = difflab_unet(base)
    modules = load_lora_weights(net, tmp_path)  # pytorch_lora_weights.safetensors, format and alphas from the file
    assert len(modules) == len(get_peft_model_state_dict(ref)) // 2
    err = (run(net, inputs) - want).abs().max().item()
    print(f"PEFT-format LoRA on UNetSD vs diffusers+peft: max |error| = {err:.2e}")
    assert err < 1e-5, err
    assert net.down_blocks[0].resnets[0].conv1.lora["default"].alpha == 12  # alpha_pattern reached


def to_kohya(state: dict, alpha_of) -> dict:
    """PEFT keys -> kohya's: lora_unet_ + the module path with _ for ., lora_down = A, lora_up = B, a scalar alpha."""
    out = {}
    for key, t in state.items():
        module, role = key.split(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = t
        out[f"{name}.alpha"] = torch.tensor(float(alpha_of(module)))
    return out


def peft_alpha(module):
    return 2 if module.endswith("attn2.to_k") else 12 if module.endswith("conv1") else 8


@needs_peft
def test_kohya_parity(sd_lora, tmp_path):
    from peft import get_peft_model_state_dict

    base, ref, config, inputs, want = sd_lora
    kohya = to_kohya(get_peft_model_state_dict(ref), peft_alpha)
    save_file(kohya, tmp_path / "kohya.safetensors")
    net = difflab_unet(base)
    load_lora_weights(net, tmp_path / "kohya.safetensors")  # format detected, alphas per key
    err = (run(net, inputs) - want).abs().max().item()
    assert err < 1e-5, err
    assert net.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.lora["default"].alpha == 2


@needs_peft
def test_kohya_uniform_alpha_matches_diffusers_loader(sd_lora):
    """diffusers' own kohya conversion (load_lora_into_unet) and difflab's agree (one alpha for all modules:
    diffusers 0.42.1 drops per-module kohya alphas of attention projections, difflab keeps them)."""
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin as Loader
    from peft import get_peft_model_state_dict

    base, ref, *_ , inputs, _ = sd_lora
    kohya = to_kohya(get_peft_model_state_dict(ref), lambda m: 6)
    state, alphas = Loader.lora_state_dict(dict(kohya))
    theirs = copy.deepcopy(base)
    Loader.load_lora_into_unet(state, alphas, unet=theirs)
    with torch.no_grad():
        want = theirs(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
    net = difflab_unet(base)
    load_lora_weights(net, kohya, format="kohya")
    torch.testing.assert_close(run(net, inputs), want, atol=1e-5, rtol=0)


@needs_peft
def test_old_diffusers_attention_processor_keys(sd_lora):
    """diffusers <= 0.20 keys (attn1.processor.to_q_lora.down.weight) land on the same modules as PEFT's."""
    from peft import get_peft_model_state_dict

    base, ref, *_ = sd_lora
    state = {k: v for k, v in get_peft_model_state_dict(ref).items() if ".attn" in k}
    old = {}
    for key, t in state.items():
        module, role = key.split(".lora_")
        block, proj = module.rsplit(".to_", 1)
        proj = "out" if proj == "out.0" else proj
        old[f"unet.{block}.processor.to_{proj}_lora.{'down' if role.startswith('A') else 'up'}.weight"] = t
    new_net, old_net = difflab_unet(base), difflab_unet(base)
    load_lora_weights(new_net, {f"unet.{k}": v for k, v in state.items()})
    assert load_lora_weights(old_net, old) == load_lora_weights(difflab_unet(base), {f"unet.{k}": v for k, v in state.items()})
    for k, v in lora_state_dict(new_net).items():
        assert torch.equal(lora_state_dict(old_net)[k], v)
    assert any(k.endswith("to_out.0.lora_A.weight") for k in lora_state_dict(old_net))


@needs_peft
def test_kohya_sgm_names_through_the_unet_key_map(sd_lora):
    """kohya's SDXL files spell the original (sgm) U-Net's names; the unet_sd key-map table resolves them."""
    from difflab.io.keymaps.unet_sd import original_table

    base, *_ = sd_lora
    net = difflab_unet(base)
    g = torch.Generator().manual_seed(0)
    keys = {  # sgm name -> the diffusers module it is
        "input_blocks_1_1_transformer_blocks_0_attn1_to_q": "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
        "input_blocks_1_0_in_layers_2": "down_blocks.0.resnets.0.conv1",
        "middle_block_0_emb_layers_1": "mid_block.resnets.0.time_emb_proj",
        "output_blocks_3_1_proj_out": "up_blocks.1.attentions.1.proj_out",
    }
    kohya = {}
    for sgm, module in keys.items():
        layer = net.get_submodule(module)
        conv = isinstance(layer, nn.Conv2d)
        shape_a = (2, layer.in_channels, *layer.kernel_size) if conv else (2, layer.in_features)
        shape_b = (layer.out_channels, 2, 1, 1) if conv else (layer.out_features, 2)
        kohya[f"lora_unet_{sgm}.lora_down.weight"] = torch.randn(shape_a, generator=g)
        kohya[f"lora_unet_{sgm}.lora_up.weight"] = torch.randn(shape_b, generator=g)
    with pytest.raises(ValueError, match="match no"):
        load_lora_weights(difflab_unet(base), kohya)
    assert load_lora_weights(net, kohya, module_table=original_table(net.config)) == sorted(keys.values(), key=[
        n for n, _ in net.named_modules()].index)
    for sgm, module in keys.items():
        assert torch.equal(net.get_submodule(module).lora_A["default"].weight, kohya[f"lora_unet_{sgm}.lora_down.weight"])


# ----------------------------------------------------------------------------------------------
# Patterns and errors


def test_patterns():
    model = tiny()
    assert find_modules(model, "lin") == ["block.lin"]  # a dotted tail, PEFT's suffix rule
    assert find_modules(model, "block.*") == ["block.lin", "block.out"]
    assert find_modules(model, "*o*") == ["conv_in", "down", "proj", "block.lin", "block.out"]  # '*' crosses dots
    assert find_modules(model, "re:(conv_in|proj)") == ["conv_in", "proj"]
    assert find_modules(model, ["re:block\\..*", "down"]) == ["down", "block.lin", "block.out"]
    with pytest.raises(ValueError, match="'re:lin' matches no"):
        find_modules(model, "re:lin")  # a regex matches the whole name


def test_errors(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="'attn\\*' matches no nn.Linear or nn.Conv2d"):
        inject_lora(model, ["block.lin", "attn*"], rank=2)
    assert list_adapters(model) == {}  # nothing injected when a pattern fails
    inject_lora(model, "block.lin", rank=2)
    with pytest.raises(ValueError, match="already exists"):
        inject_lora(model, "*", rank=2)
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        set_adapter_weights(model, {"nope": 1.0})
    with pytest.raises(ValueError, match="rank"):
        inject_lora(model, "proj", rank=0, name="x")
    with pytest.raises(ValueError, match="grouped"):
        inject_lora(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), "0", rank=2)

    fresh = tiny()
    good = {"block.lin.lora_A.weight": torch.zeros(2, 8), "block.lin.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match="1 LoRA keys match no .*unet.mid.to_q.lora_A.weight"):
        load_lora_weights(fresh, {**{f"unet.{k}": v for k, v in good.items()}, "unet.mid.to_q.lora_A.weight": torch.zeros(2, 8)})
    with pytest.raises(ValueError, match="needs \\(8, 2\\)"):
        load_lora_weights(fresh, {**good, "block.lin.lora_B.weight": torch.zeros(8, 3)}, prefix="")
    with pytest.raises(ValueError, match="DoRA"):
        load_lora_weights(fresh, {**good, "block.lin.lora_magnitude_vector": torch.ones(8)}, prefix="")
    with pytest.raises(ValueError, match="components \\['text_encoder.'\\]"):
        load_lora_weights(fresh, {f"text_encoder.{k}": v for k, v in good.items()})
    with pytest.raises(ValueError, match="no kohya keys"):
        load_lora_weights(fresh, {"lora_te_block_lin.lora_down.weight": torch.zeros(2, 8)}, format="kohya")
    torch.save(good, tmp_path / "lora.bin")
    with pytest.raises(ValueError, match="safetensors"):
        load_lora_weights(fresh, tmp_path / "lora.bin")
    assert list_adapters(fresh) == {}  # failed loads leave the model untouched
    assert load_lora_weights(fresh, {f"unet.{k}": v for k, v in good.items()}) == ["block.lin"]
