"""Chapter 45: a timeline of diffusion research, each entry tied to the difflab code that implements it.

The chronology is data (``TIMELINE``). The example checks that every entry's difflab symbol exists (it
imports each ``module:name``), counts the entries per year and per theme, draws the timeline and, with
``--markdown``, prints the chapter's table. ``python examples/guide/45_timeline.py [--fast --out DIR]``
(about 3 s).
"""
from __future__ import annotations

import importlib
from collections import Counter

import _guide as guide

BOUNDS = {
    "entries": (50, 200),          # the chronology is not allowed to shrink unnoticed
    "missing_symbols": (0, 0),     # every entry points at code that exists
    "first_year": (2015, 2015),
    "last_year": (2024, 2026),
    "themes": (7, 7),
}

# (year-month, who, what, venue, difflab symbol "module:name", theme, guide chapter or 0)
TIMELINE = [
    ("2015-03", "Sohl-Dickstein et al.", "Deep unsupervised learning using nonequilibrium thermodynamics (diffusion)", "ICML 2015", "difflab.core.forward:q_sample", "process", 1),
    ("2017-06", "Heusel et al.", "GANs trained by a two time-scale update rule (FID)", "NeurIPS 2017", "difflab.eval.metrics:fid", "evaluation", 40),
    ("2017-10", "Micikevicius et al.", "Mixed precision training (fp16 + loss scaling)", "ICLR 2018", "difflab.train:TrainConfig", "speed", 28),
    ("2019-07", "Song & Ermon", "Generative modeling by estimating gradients of the data distribution (NCSN)", "NeurIPS 2019", "difflab.core.denoiser:VE", "process", 11),
    ("2020-06", "Ho, Jain & Abbeel", "Denoising diffusion probabilistic models (DDPM)", "NeurIPS 2020", "difflab.samplers.ddpm:sample_ddpm", "process", 3),
    ("2020-06", "Locatello et al.", "Object-centric learning with slot attention (slot attention)", "NeurIPS 2020", "difflab.nn.slot_attention:SlotAttention", "modality", 47),
    ("2020-09", "Kong et al.", "DiffWave: a versatile diffusion model for audio synthesis", "ICLR 2021", "difflab.nn.diffwave:DiffWave", "modality", 24),
    ("2020-10", "Song, Meng & Ermon", "Denoising diffusion implicit models (DDIM)", "ICLR 2021", "difflab.samplers.ddim:sample_ddim", "sampling", 4),
    ("2020-11", "Song et al.", "Score-based generative modeling through SDEs (score SDE)", "ICLR 2021", "difflab.samplers.adaptive:solve_ode", "process", 25),
    ("2021-02", "Nichol & Dhariwal", "Improved denoising diffusion probabilistic models (iDDPM)", "ICML 2021", "difflab.core.schedules:betas_cosine", "process", 20),
    ("2021-03", "Luo & Hu", "Diffusion probabilistic models for 3D point cloud generation (DPM-3D)", "CVPR 2021", "difflab.pipelines.points:generate_points", "modality", 23),
    ("2021-04", "Saharia et al.", "Image super-resolution via iterative refinement (SR3)", "TPAMI 2022", "difflab.nn.sr:SRUNet", "modality", 46),
    ("2021-05", "Dhariwal & Nichol", "Diffusion models beat GANs on image synthesis (ADM, classifier guidance)", "NeurIPS 2021", "difflab.guidance.classifier:ClassifierGuidance", "guidance", 6),
    ("2021-05", "Ho et al.", "Cascaded diffusion models for high fidelity image generation (CDM)", "JMLR 2022", "difflab.core.forward:noise_augment", "architecture", 35),
    ("2021-06", "Hu et al.", "LoRA: low-rank adaptation of large language models", "ICLR 2022", "difflab.adapters.lora:inject_lora", "architecture", 0),
    ("2021-07", "Kingma et al.", "Variational diffusion models (VDM)", "NeurIPS 2021", "difflab.core.schedules:log_snr_from_sigma", "process", 25),
    ("2021-12", "Rombach et al.", "High-resolution image synthesis with latent diffusion models (LDM)", "CVPR 2022", "difflab.nn.vae:AutoencoderKL", "architecture", 7),
    ("2022-01", "Lugmayr et al.", "RePaint: inpainting using denoising diffusion probabilistic models", "CVPR 2022", "difflab.guidance.inpaint:sample_repaint", "guidance", 16),
    ("2022-02", "Salimans & Ho", "Progressive distillation for fast sampling of diffusion models (PD)", "ICLR 2022", "difflab.train.objectives.progressive:progressive_distillation", "speed", 31),
    ("2022-04", "Ho et al.", "Video diffusion models (VDM video)", "NeurIPS 2022", "difflab.nn.video_unet:VideoUNet", "modality", 22),
    ("2022-04", "Zhang & Chen", "Fast sampling of diffusion models with exponential integrator (DEIS)", "ICLR 2023", "difflab.samplers.deis:sample_deis", "sampling", 14),
    ("2022-05", "Janner et al.", "Planning with diffusion for flexible behavior synthesis (Diffuser)", "ICML 2022", "difflab.pipelines.policy:plan_trajectories", "modality", 49),
    ("2022-06", "Karras et al.", "Elucidating the design space of diffusion-based generative models (EDM)", "NeurIPS 2022", "difflab.samplers.euler:sample_heun", "sampling", 14),
    ("2022-06", "Lu et al.", "DPM-Solver: a fast ODE solver for diffusion probabilistic models", "NeurIPS 2022", "difflab.samplers.dpm_solver:sample_dpm_solver", "sampling", 14),
    ("2022-07", "Ho & Salimans", "Classifier-free diffusion guidance (CFG)", "NeurIPS workshop 2021", "difflab.guidance.cfg:ClassifierFreeGuidance", "guidance", 6),
    ("2022-08", "Ruiz et al.", "DreamBooth: fine tuning text-to-image diffusion models for subject-driven generation", "CVPR 2023", "difflab.train.objectives.dreambooth:SubjectObjective", "architecture", 0),
    ("2022-09", "Lipman et al.", "Flow matching for generative modeling (flow matching)", "ICLR 2023", "difflab.samplers.flow:sample_flow_euler", "process", 26),
    ("2022-09", "Liu, Gong & Liu", "Flow straight and fast: learning to generate and transfer data with rectified flow (rectified flow)", "ICLR 2023", "difflab.train.objectives.reflow:Reflow", "process", 26),
    ("2022-09", "Poole et al.", "DreamFusion: text-to-3D using 2D diffusion (score distillation)", "ICLR 2023", "difflab.pipelines.score_distillation:sds_gradient", "modality", 23),
    ("2022-09", "Tevet et al.", "Human motion diffusion model (MDM)", "ICLR 2023", "difflab.nn.mdm:MDM", "modality", 48),
    ("2022-10", "Hong et al.", "Improving sample quality of diffusion models using self-attention guidance (SAG)", "ICCV 2023", "difflab.guidance.attention:SelfAttentionGuidance", "guidance", 34),
    ("2022-11", "Lu et al.", "DPM-Solver++: fast solver for guided sampling of diffusion probabilistic models", "arXiv 2022", "difflab.samplers.dpm_solver:sample_dpmpp_2m", "sampling", 14),
    ("2022-11", "Schramowski et al.", "Safe latent diffusion: mitigating inappropriate degeneration", "CVPR 2023", "difflab.guidance.safety:SafetyGuidance", "guidance", 37),
    ("2022-12", "Peebles & Xie", "Scalable diffusion models with transformers (DiT)", "ICCV 2023", "difflab.nn.dit:DiT", "architecture", 39),
    ("2023-01", "Hoogeboom, Heek & Salimans", "simple diffusion: end-to-end diffusion for high resolution images", "ICML 2023", "difflab.core.schedules:resolution_shift", "process", 21),
    ("2023-01", "Carlini et al.", "Extracting training data from diffusion models (memorization)", "USENIX Security 2023", "difflab.eval.memorization:memorization", "evaluation", 43),
    ("2023-01", "Chen", "On the importance of noise scheduling for diffusion models (sigmoid schedule)", "arXiv 2023", "difflab.core.schedules:sigmoid_alpha_bar", "process", 20),
    ("2023-02", "Zhang, Rao & Agrawala", "Adding conditional control to text-to-image diffusion models (ControlNet)", "ICCV 2023", "difflab.adapters.controlnet:ControlNet", "guidance", 18),
    ("2023-02", "Zhao et al.", "UniPC: a unified predictor-corrector framework for fast sampling", "NeurIPS 2023", "difflab.samplers.unipc:sample_unipc", "sampling", 14),
    ("2023-03", "Song et al.", "Consistency models (CM)", "ICML 2023", "difflab.core.consistency:ConsistencyFunction", "speed", 32),
    ("2023-03", "Chi et al.", "Diffusion policy: visuomotor policy learning via action diffusion", "RSS 2023", "difflab.pipelines.policy:diffusion_policy", "modality", 49),
    ("2023-03", "Hang et al.", "Efficient diffusion training via min-SNR weighting strategy (min-SNR)", "ICCV 2023", "difflab.train.losses:loss_weight", "process", 26),
    ("2023-03", "Kynkaanniemi et al.", "The role of ImageNet classes in Frechet inception distance (CLIP-FID)", "ICLR 2023", "difflab.eval.metrics:clip_fid", "evaluation", 40),
    ("2023-05", "Lin et al.", "Common diffusion noise schedules and sample steps are flawed (zero terminal SNR)", "WACV 2024", "difflab.core.schedules:rescale_zero_terminal_snr", "process", 1),
    ("2023-05", "Stan et al.", "LDM3D: latent diffusion model for 3D", "CVPR workshops 2023", "difflab.pipelines.image_depth:generate_image_depth", "modality", 44),
    ("2023-05", "Wang et al.", "ProlificDreamer: variational score distillation", "NeurIPS 2023", "difflab.pipelines.score_distillation:vsd_gradient", "modality", 23),
    ("2023-05", "Wu et al.", "SlotDiffusion: object-centric generative modeling with diffusion models", "NeurIPS 2023", "difflab.pipelines.slots:decode_slots", "modality", 47),
    ("2023-07", "Podell et al.", "SDXL: improving latent diffusion models for high-resolution image synthesis", "ICLR 2024", "difflab.nn.unet_sd:UNetSD", "architecture", 7),
    ("2023-07", "Guo et al.", "AnimateDiff: animate your personalized text-to-image diffusion models", "ICLR 2024", "difflab.nn.motion:MotionUNet", "modality", 22),
    ("2023-08", "Ye et al.", "IP-Adapter: text compatible image prompt adapter", "arXiv 2023", "difflab.adapters.ip_adapter:install_ip_adapter", "guidance", 19),
    ("2023-10", "Luo et al.", "Latent consistency models (LCM)", "arXiv 2023", "difflab.samplers.consistency:sample_lcm", "speed", 32),
    ("2023-11", "Luo et al.", "LCM-LoRA: a universal stable-diffusion acceleration module", "arXiv 2023", "difflab.train.objectives.lcm:lcm_lora_student", "speed", 32),
    ("2023-12", "Ke et al.", "Repurposing diffusion-based image generators for depth estimation (Marigold)", "CVPR 2024", "difflab.pipelines.image_depth:depth_from_image", "modality", 44),
    ("2024-02", "Zheng et al.", "Trajectory consistency distillation (TCD)", "arXiv 2024", "difflab.samplers.consistency:sample_tcd", "speed", 32),
    ("2024-03", "Esser et al.", "Scaling rectified flow transformers for high-resolution image synthesis (SD3)", "ICML 2024", "difflab.nn.mmdit:MMDiT", "architecture", 7),
    ("2024-03", "Ahn et al.", "Self-rectifying diffusion sampling with perturbed-attention guidance (PAG)", "ECCV 2024", "difflab.guidance.attention:PerturbedAttentionGuidance", "guidance", 34),
    ("2024-07", "Fei et al.", "Scaling diffusion transformers to 16 billion parameters (DiT-MoE)", "arXiv 2024", "difflab.nn.moe:MoEFeedForward", "architecture", 39),
    ("2024-08", "Black Forest Labs", "FLUX.1: a rectified-flow transformer, guidance distilled", "model release 2024", "difflab.nn.flux:FluxTransformer", "architecture", 7),
]
THEMES = ("process", "sampling", "guidance", "architecture", "speed", "modality", "evaluation")


def resolve(symbol: str) -> bool:
    """Whether ``module:name`` imports."""
    module, name = symbol.split(":")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def short_name(what: str, who: str) -> str:
    """A work's name on the picture: its acronym in parentheses, else the text before a colon, else who."""
    if what.endswith(")"):
        return what[what.rindex("(") + 1:-1]
    if ":" in what and len(what.split(":")[0]) <= 22:
        return what.split(":")[0]
    return who


def markdown(chapters: dict[int, str]) -> str:
    """The chapter's table: date, work, where difflab implements it, the guide chapter."""
    rows = ["| date | work | in difflab | chapter |", "| --- | --- | --- | --- |"]
    for date, who, what, venue, symbol, _, ch in TIMELINE:
        module, name = symbol.split(":")
        path = "../../" + module.replace(".", "/") + (".py" if not module.endswith("train") else "/__init__.py")
        chapter = f"[{ch}]({chapters[ch]})" if ch in chapters else "-"
        rows.append(f"| {date} | {who}, *{what}*, {venue} | [`{name}`]({path}) | {chapter} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    args = guide.parse(argv, __doc__, markdown=(int, 0, "1: print the chapter's table"))
    missing = [s for *_, s, _, _ in TIMELINE if not resolve(s)]
    for s in missing:
        print(f"missing: {s}")
    years = Counter(int(date[:4]) for date, *_ in TIMELINE)
    themes = Counter(t for *_, t, _ in TIMELINE)
    figures = guide.report({"entries": len(TIMELINE), "missing_symbols": len(missing), "first_year": min(years),
                            "last_year": max(years), "themes": len(themes)})
    if args.markdown:
        chapters = {int(p.name[:2]): p.name for p in (guide.ROOT / "docs" / "guide").glob("[0-9][0-9]-*.md")}
        print(markdown(chapters))

    plt = guide.pyplot()
    fig, ax = plt.subplots(figsize=(12, 7.5))
    colours = dict(zip(THEMES, plt.get_cmap("tab10").colors))
    lanes = {t: i for i, t in enumerate(THEMES)}
    for theme in THEMES:
        entries = sorted((e for e in TIMELINE if e[5] == theme), key=lambda e: e[0])
        for i, (date, who, what, *_rest) in enumerate(entries):
            x = int(date[:4]) + (int(date[5:]) - 0.5) / 12
            y = lanes[theme] + 0.13 * (i % 6) - 0.33
            ax.plot(x, y, "o", color=colours[theme], ms=4)
            ax.annotate(short_name(what, who), (x, y), fontsize=6, xytext=(3, 0), textcoords="offset points", va="center")
    ax.set_yticks(range(len(THEMES)), THEMES)
    ax.set_xlim(2015, 2025.6)
    ax.set_xlabel("year (entries annotated with a short name)")
    ax.grid(axis="x", lw=0.3)
    ax.set_title(f"{len(TIMELINE)} works difflab implements, by theme")
    guide.save(fig, guide.picture(args, "45_timeline.png"))
    return figures


if __name__ == "__main__":
    main()
