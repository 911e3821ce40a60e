"""`difflab memory --preset sdxl|sd3|flux`: the real-size networks built on the meta device (no weights, no
memory), their parameters counted exactly against diffusers' classes and the published sizes, the
meta-device live-bytes tracker on cases with a known answer, and the placement suggested for a GPU."""
import pytest
import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

from difflab.cli import main
from difflab.perf.families import GIB, MetaPeak, count_parameters, family, family_plan, on_meta, peak_bytes, suggest

pytest.importorskip("transformers", reason="T5-XXL is counted through transformers")
from test_sdxl import SDXL_BASE_CONFIG  # noqa: E402

# the published transformer/config.json of SD3 medium and FLUX.1-dev (keys that differ from diffusers' defaults)
SD3_MEDIUM = dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192, sample_size=128)
FLUX_DEV = dict(guidance_embeds=True)


@pytest.mark.parametrize("name, reference, published", [
    ("sdxl", lambda: UNet2DConditionModel(**SDXL_BASE_CONFIG), 2_567_463_684),  # SDXL base 1.0's U-Net
    ("sd3", lambda: SD3Transformer2DModel(**SD3_MEDIUM), 2.03e9),  # "2B" (Esser et al. 2024; SD3 medium)
    ("flux-dev", lambda: FluxTransformer2DModel(**FLUX_DEV), 11_901_408_320),  # FLUX.1-dev, "12B"
], ids=["sdxl", "sd3", "flux"])
def test_real_size_denoisers_count_as_published(name, reference, published):
    ours, theirs = on_meta(family(name).denoiser), on_meta(reference)
    assert {p.device.type for p in ours.parameters()} == {"meta"}
    n = count_parameters(ours)
    assert n == count_parameters(theirs)  # diffusers' own class, same config
    assert abs(n - published) <= 0.005 * published, n


def test_meta_peak_counts_what_is_alive_at_once():
    x = torch.empty(64, 256, device="meta")  # 64 KiB
    size = x.numel() * 4

    def chain(x):
        a = x * 2  # +1
        b = a + 1  # +1: a and b alive (peak 2)
        del a
        c = b.view(256, 64).t()  # views: nothing new
        c.mul_(3)  # in place: nothing new
        d = c.sum(0)  # +1 small
        return b, d

    with MetaPeak() as mode:
        out = chain(x)
    assert mode.peak == 2 * size  # a and b; a is gone before d
    assert mode.live == size + 256 * 4  # b and d (256 sums) still held by `out`
    del out
    assert mode.live == 0
    # attention is counted as a fused kernel: the output, never the (N, N) scores
    q = torch.empty(1, 2, 4096, 64, device="meta", dtype=torch.float16)
    assert peak_bytes(torch.nn.functional.scaled_dot_product_attention, q, q, q) == q.numel() * 2


def test_sdxl_plan_and_suggestions():
    fp16, fp32 = family_plan("sdxl", precision="fp16"), family_plan("sdxl", precision="fp32")
    assert fp16["parameters"]["denoiser"] == 2_567_463_684 and fp16["weights"]["denoiser"] == 2 * 2_567_463_684
    assert fp32["weights"] == {k: 2 * v for k, v in fp16["weights"].items()}
    assert fp32["step"] == pytest.approx(2 * fp16["step"], rel=0.05)  # activations scale with the dtype too
    peaks = list(fp16["plans"].values())
    assert peaks == sorted(peaks, reverse=True) and fp16["decode"] > fp16["decode_tiled"] > 0
    assert 0.1 * GIB < fp16["step"] < 4 * GIB  # two 1024x1024 latents (guidance) through the U-Net
    assert suggest(fp16, 80)[0] == "gpu"
    placement, peak = suggest(fp16, 4)
    assert placement == "sequential offload + VAE tiling" and peak <= 0.9 * 4
    assert suggest(fp16, 0.25)[0] is None
    with pytest.raises(ValueError, match="gpu_gb"):
        suggest(fp16, 0)


def test_memory_command_prints_a_family_plan(capsys):
    assert main(["memory", "--preset", "flux-schnell", "--precision", "bf16", "--image-size", "512", "--gpu-gb", "12"]) == 0
    out = capsys.readouterr().out
    assert "11.891 B params" in out and "512x512" in out and "on a 12 GiB GPU: sequential offload + VAE tiling" in out


def test_offload_blocks_keeps_blocks_on_the_cpu_between_calls():
    """Sequential offload: the blocks' weights stay on the CPU and reach the device only while they run;
    every other weight is on the device (the meta device here: no GPU needed, nothing allocated)."""
    from difflab.nn.flux import FluxConfig, FluxTransformer
    from difflab.perf.families import denoiser_blocks
    from difflab.perf.memory import offload_blocks
    net = FluxTransformer(FluxConfig(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                                     in_channels=16, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)))
    blocks = denoiser_blocks(net)
    assert len(blocks) == 3
    hooks = offload_blocks(net, "meta", blocks)
    assert len(hooks) == 3 and net.x_embedder.weight.device.type == "meta" and net.proj_out.weight.device.type == "meta"
    seen = []
    blocks[1].register_forward_pre_hook(lambda m, a: seen.append(next(m.parameters()).device.type))
    m = dict(device="meta")
    with torch.no_grad():
        out = net(torch.empty(1, 4, 4, 4, **m), torch.empty(1, **m), context=torch.empty(1, 3, 32, **m),
                  pooled=torch.empty(1, 32, **m))
    assert out.shape == (1, 4, 4, 4) and out.device.type == "meta"
    assert seen == ["meta"]  # on the device while it ran ...
    assert {p.device.type for b in blocks for p in b.parameters()} == {"cpu"}  # ... and back on the CPU after
