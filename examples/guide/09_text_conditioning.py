"""Chapter 9: conditioning on text through a text encoder (CLIP's role in Stable Diffusion).

Offline there are no CLIP weights, so the chapter uses what difflab's text demo trains from
scratch: a tiny word-level text encoder and a latent U-Net that cross-attends to its tokens
(the demo at guide scale, cached for chapter 13 too). It samples every digit from a training
caption template and from a held-out one and lets the judge read them; shows how close the pooled
prompt vectors of the same digit are; and checks, on a small random CLIP text transformer, the two
facts that decide what Stable Diffusion sees: the causal mask (a token's state ignores later
tokens) and the pooled vector (the end-of-text token's state).
``python examples/guide/09_text_conditioning.py [--fast --out DIR]`` (full: 53 s of CPU time on one
thread the first time, which trains the text model, 19 s once it is cached, measured on the shared,
loaded 2-core machine; --fast: 12 s with the model cached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import _arch as arch
import _guide as guide
from difflab.demos.text import NUMBER_WORDS, caption
from difflab.nn.layers import CrossAttention
from difflab.nn.text import CLIPTextEncoder, CLIPTextEncoderConfig
from difflab.pipelines import text_to_image

BOUNDS = {
    "accuracy_guided": (0.3, 1.0),           # the judge reads the digit the prompt names (chance: 0.1)
    "pooled_same_minus_other": (0.1, 2.0),   # pooled vectors: same digit closer than different digits
    "clip_causal_max_change": (0.0, 0.0),    # changing the last token leaves earlier states exactly as they were
    "clip_pooled_is_eos_state": (0.0, 0.0),  # pooled vector = final state at the end-of-text token
}
TEMPLATES = ("a handwritten {word}", "a digit {word}")  # a training template, a held-out one


def clip_facts(seed: int) -> dict:
    """A small random CLIP text transformer (difflab's, transformers' layout): the causal mask and the pooled vector."""
    c = CLIPTextEncoderConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=12, bos_token_id=98,
                              eos_token_id=99, pad_token_id=99)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPTextEncoder(c).eval()
    ids = torch.tensor([[98, 5, 17, 40, 99, 99, 99, 99, 99, 99, 99, 99]])  # <start> three words <end>, padded with <end>
    other = ids.clone()
    other[0, 3] = 41                                                        # change the last word
    with torch.no_grad():
        h1, pooled = clip(ids)
        h2, _ = clip(other)
    return {"clip_causal_max_change": float((h1[0, :3] - h2[0, :3]).abs().max()),
            "clip_later_change": float((h1[0, 3:] - h2[0, 3:]).abs().max()),
            "clip_pooled_is_eos_state": float((pooled[0] - h1[0, 4]).abs().max())}


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__)
    world = guide.digits_world()
    tm = arch.text_model(args.fast, args.seed)
    text, vae, denoiser = tm["text"], tm["vae"], tm["denoiser"]

    # 1. Prompts in, digits out: a training template and a held-out one, with and without guidance.
    per = 2 if args.fast else 6
    prompts = [caption(d, t) for t in TEMPLATES for d in range(10) for _ in range(per)]
    asked = torch.tensor([d for _ in TEMPLATES for d in range(10) for _ in range(per)])
    steps = 10 if args.fast else 25
    common = dict(height=16, width=16, seed=args.seed, sampler="ddim", steps=steps, output_type="pt", progress=False)
    with arch.Timer() as t_sample:
        guided = text_to_image(denoiser, text, vae, prompts, guidance_scale=3.0, **common)
    unguided = text_to_image(denoiser, text, vae, prompts, guidance_scale=1.0, **common)
    held = torch.arange(len(prompts)) >= len(prompts) // 2
    right = world["judge"].predict(guided) == asked

    # 2. Pooled prompt vectors: the same digit written two ways against other digits.
    with torch.no_grad():
        pooled = F.normalize(text.encode([f"the digit {d}" for d in range(10)] + [f"a handwritten {w}" for w in NUMBER_WORDS])[1], dim=-1)
    cos = pooled[:10] @ pooled[10:].T
    same, other = float(cos.diag().mean()), float(cos[~torch.eye(10, dtype=torch.bool)].mean())

    # 3. Where the cross-attention looks: the mean weight per token of one prompt, over a sampling run's inputs.
    prompt = "a handwritten seven"
    ids, mask = text.tokenize([prompt] * 4)
    z = torch.randn((4, 4, 4, 4), generator=torch.Generator().manual_seed(args.seed))
    calls = arch.record(tm["net"], CrossAttention, lambda: denoiser(z, torch.full((4,), 1.0), input_ids=ids))
    per_token = torch.stack([arch.cross_attention_weights(m, a[0], a[1], a[2]).mean((0, 1, 2)) for _, m, a in calls]).mean(0)

    figures = guide.report({
        "vocabulary": len(tm["data"]["vocab"]), "text_params": arch.count(text), "unet_params": arch.count(tm["net"].unet),
        "train_steps": tm["config"].steps,
        "accuracy_guided": float(right.float().mean()), "accuracy_train_template": float(right[~held].float().mean()),
        "accuracy_heldout_template": float(right[held].float().mean()),
        "accuracy_unguided": world["judge"].accuracy(unguided, asked),
        "pooled_cos_same_digit": same, "pooled_cos_other_digit": other, "pooled_same_minus_other": same - other,
        "cross_attention_on_seven": float(per_token[2]),
        "sample_cpu_s": t_sample.cpu, **clip_facts(args.seed),
    })

    # 4. The picture: samples per prompt (rows: digits; columns: the two templates), attention per token.
    plt = guide.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    imgs = guided.reshape(len(TEMPLATES), 10, per, 16, 16)
    for ax, j in zip(axes[:2], range(len(TEMPLATES))):
        ax.imshow(imgs[j].permute(0, 2, 1, 3).reshape(160, per * 16), cmap="gray", vmin=-1, vmax=1)
        ax.set_yticks([8 + 16 * d for d in range(10)], [caption(d, TEMPLATES[j]) for d in range(10)], fontsize=7)
        ax.set_xticks([]), ax.set_title(("training" if j == 0 else "held-out") + " template, guidance 3", fontsize=9)
    words = prompt.split()
    axes[2].bar(range(len(words)), per_token[:len(words)].tolist())
    axes[2].set_xticks(range(len(words)), words), axes[2].set(ylabel="mean cross-attention weight",
                                                               title=f"pixels attending to '{prompt}'")
    guide.save(fig, guide.picture(args, "09_text_conditioning.png"))
    return figures


if __name__ == "__main__":
    main()
