"""Key maps of LoRA files, as data (STYLE.md, rule 9).

A LoRA file holds, per adapted module, the down-projection A (r, in[, kh, kw]), the up-projection
B (out, r[, 1, 1]) and optionally a scalar alpha (Hu et al. 2021, eq. 3: h = W0 x + (alpha/r) B A x).
The formats users have differ only in how they spell a key
``<component prefix><module path><separator><role suffix>``:

| format | a key | module path |
| --- | --- | --- |
| PEFT / diffusers | ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` | dotted |
| old diffusers attention processors | ``unet.down_blocks.0...attn1.processor.to_q_lora.down.weight`` | dotted, projection in the suffix |
| kohya (sd-scripts) | ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight`` | dots spelled ``_`` |
| difflab (:func:`difflab.adapters.save_lora`) | ``down.1.1.qkv.lora_A.weight`` | PEFT's, no prefix |

A table is a list of rows ``(suffix, role, tails)``: a key ending in ``"." + suffix`` belongs to
the module named by the rest of the key followed by the first of ``tails`` that names a module of
the model (``""``: the rest itself). ``role`` is ``"A"``, ``"B"`` or ``"alpha"``. Kohya paths
spell dots as underscores; they are resolved against the model's own module names
(:func:`underscore_names`), never guessed. This module is pure key logic: it sees names, not
modules or tensors' values.
"""
from __future__ import annotations

import re

from . import rename_key

# ----------------------------------------------------------------------------------------------
# The tables

# PEFT's layout (get_peft_model_state_dict, diffusers' save_lora_weights), plus the two older
# diffusers spellings: LoRACompatibleLinear/Conv (``.lora.down``) and the text-encoder monkey
# patch (``.lora_linear_layer.down``); diffusers' conversions of kohya files keep ``.alpha``.
PEFT = [
    ("lora_A.weight", "A", ("",)),
    ("lora_B.weight", "B", ("",)),
    ("lora.down.weight", "A", ("",)),
    ("lora.up.weight", "B", ("",)),
    ("lora_linear_layer.down.weight", "A", ("",)),
    ("lora_linear_layer.up.weight", "B", ("",)),
    ("alpha", "alpha", ("",)),
]

# diffusers' LoRAAttnProcessor (diffusers <= 0.20): the key names the attention block; the suffix
# names its projection, spelled ``to_q`` in the U-Net and ``q_proj`` in a CLIP text encoder.
_PROJECTIONS = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
                "to_out": ("to_out.0", "out_proj")}
DIFFUSERS_ATTN_PROCESSOR = [
    (f"{processor}{name}_lora.{part}.weight", role, tails)
    for name, tails in _PROJECTIONS.items()
    for part, role in (("down", "A"), ("up", "B"))
    for processor in ("processor.", "")
]

# kohya sd-scripts: ``<prefix><module path with _ for .>.<suffix>``
KOHYA = [
    ("lora_down.weight", "A", ("",)),
    ("lora_up.weight", "B", ("",)),
    ("alpha", "alpha", ("",)),
]

FORMATS = {
    "peft": PEFT + DIFFUSERS_ATTN_PROCESSOR,
    "difflab": PEFT,
    "kohya": KOHYA,
}

# (difflab prefix of a component, its kohya prefixes)
KOHYA_PREFIXES = [
    ("unet.", ("lora_unet_",)),
    ("text_encoder.", ("lora_te_", "lora_te1_")),
    ("text_encoder_2.", ("lora_te2_",)),
    ("transformer.", ("lora_transformer_",)),
    ("", ("lora_",)),
]

# Prefixes of the components of a pipeline-level LoRA file (diffusers), and PEFT's model wrapper.
COMPONENT_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.", "prior.", "controlnet.")
PEFT_WRAPPER_PREFIX = "base_model.model."

# (regex searched in a key, what it is): adapters that are not plain LoRA; loading them is an error, not a guess.
UNSUPPORTED = [
    (r"\.dora_scale$", "DoRA (weight-decomposed LoRA)"),
    (r"\.lora_magnitude_vector(\.|$)", "DoRA (weight-decomposed LoRA)"),
    (r"\.lora_B\.bias$", "PEFT's lora_bias"),
    (r"\.lora_up\.bias$", "a LoRA bias"),
    (r"\.hada_w[12]_[ab]$", "LoHa (LyCORIS)"),
    (r"\.lokr_w[12](_[ab])?$", "LoKr (LyCORIS)"),
    (r"\.lora_mid\.weight$", "LoCon with a Tucker core (LyCORIS)"),
    (r"\.oft_(blocks|R)", "OFT"),
    (r"\.diff(_b)?$", "a full weight difference (LyCORIS)"),
]

# (key ending, format) for format="auto"; the first row any key matches wins.
MARKERS = [
    (".lora_down.weight", "kohya"),
    (".lora_up.weight", "kohya"),
    (".lora_A.weight", "peft"),
    (".lora_B.weight", "peft"),
    ("_lora.down.weight", "peft"),
    (".lora.down.weight", "peft"),
    (".lora_linear_layer.down.weight", "peft"),
]


# ----------------------------------------------------------------------------------------------
# The engine


def detect_format(keys) -> str:
    """``"kohya"`` or ``"peft"`` from the key spellings (:data:`MARKERS`)."""
    keys = list(keys)
    for ending, fmt in MARKERS:
        if any(k.endswith(ending) for k in keys):
            return fmt
    raise ValueError("cannot tell the LoRA format from the keys (no lora_A/lora_B, lora_down/lora_up or *_lora.down "
                     f"key); pass format=. First keys: {sorted(keys)[:5]}")


def check_supported(keys) -> None:
    """Raise ValueError naming the adapter kind when a key belongs to something that is not plain LoRA."""
    for pattern, what in UNSUPPORTED:
        hits = [k for k in keys if re.search(pattern, k)]
        if hits:
            raise ValueError(f"this file holds {what} (e.g. key {hits[0]!r}), which difflab's LoRA does not load")


def select_component(keys, prefix: str, fmt: str) -> tuple[dict[str, str], list[str]]:
    """``({stripped key: key}, skipped keys)``: the keys of the component under ``prefix``.

    PEFT's wrapper prefix ``base_model.model.`` is dropped first. A file with keys under ``prefix``
    gives those (other components are skipped); a file with no component prefix at all belongs to
    the model as it is; a file whose components are all others is an error naming them.
    """
    if fmt == "kohya":
        kohya = [p for difflab_prefix, ps in KOHYA_PREFIXES if difflab_prefix == prefix for p in ps]
        prefixes = kohya or ["lora_" + prefix.rstrip(".").replace(".", "_") + "_"]
        chosen = {k[len(p):]: k for k in keys for p in prefixes if k.startswith(p)}
        if not chosen:
            raise ValueError(f"no kohya keys start with {prefixes} (prefix={prefix!r}); first keys: {sorted(keys)[:3]}")
        return chosen, [k for k in keys if k not in chosen.values()]
    keys = list(keys)
    plain = {(k[len(PEFT_WRAPPER_PREFIX):] if k.startswith(PEFT_WRAPPER_PREFIX) else k): k for k in keys}
    if prefix and any(k.startswith(prefix) for k in plain):
        chosen = {k[len(prefix):]: orig for k, orig in plain.items() if k.startswith(prefix)}
        return chosen, [k for k in keys if k not in chosen.values()]
    components = sorted({p for k in plain for p in COMPONENT_PREFIXES if k.startswith(p)})
    if components:
        raise ValueError(f"no keys under prefix {prefix!r}; the file holds the components {components}: pass one as prefix=")
    return plain, []


def underscore_names(module_names) -> tuple[dict[str, str], set[str]]:
    """``({name with "_" for ".": name}, ambiguous spellings)`` of the model's module names (kohya)."""
    table, ambiguous = {}, set()
    for name in module_names:
        key = name.replace(".", "_")
        if key in table and table[key] != name:
            ambiguous.add(key)
        table[key] = name
    return table, ambiguous


def alias_names(module_names, module_table) -> dict[str, str]:
    """``{foreign name: model name}``: each model module name renamed into a foreign layout through a
    key-map table of rows ``(foreign, difflab)`` (e.g. :func:`difflab.io.keymaps.unet_sd.original_table`),
    so LoRA keys spelled in that layout find their modules."""
    out = {}
    for name in module_names:
        foreign, _ = rename_key(name + ".", module_table, reverse=True)
        out[foreign[:-1]] = name
    return out


def parse_keys(keys, fmt: str, module_names, *, module_table=None) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group (component-stripped) LoRA keys by the module they adapt.

    ``keys``: keys with the component prefix removed; ``module_names``: the names of the model's
    adaptable modules; ``module_table``: optional key-map rows ``(foreign, difflab)`` for module
    paths spelled in a foreign layout. Returns ``({module: {role: key}}, unmatched keys)``: a key is
    unmatched when no row of the format fits it or its module is not one of ``module_names``.
    """
    rows = sorted(FORMATS[fmt], key=lambda row: -len(row[0]))  # the longest suffix first
    names = set(module_names)
    aliases = alias_names(names, module_table) if module_table is not None else {}
    if fmt == "kohya":
        spelled, ambiguous = underscore_names(names)
        for foreign, name in aliases.items():
            spelled.setdefault(foreign.replace(".", "_"), name)
    out: dict[str, dict[str, str]] = {}
    unmatched = []
    for key in keys:
        row = next((r for r in rows if key.endswith("." + r[0])), None)
        if row is None:
            unmatched.append(key)
            continue
        suffix, role, tails = row
        path = key[: -len(suffix) - 1]
        module = None
        for tail in tails:
            candidate = f"{path}.{tail}" if tail else path
            if fmt == "kohya":
                candidate = candidate.replace(".", "_")
                if candidate in ambiguous:
                    raise ValueError(f"kohya key {key!r} names {candidate!r}, which spells more than one module of the model")
                module = spelled.get(candidate)
            else:
                module = candidate if candidate in names else aliases.get(candidate)
            if module is not None:
                break
        if module is None:
            unmatched.append(key)
            continue
        if role in out.setdefault(module, {}):
            raise ValueError(f"two keys give the {role} of module {module!r}: {out[module][role]!r} and {key!r}")
        out[module][role] = key
    return out, unmatched


def pattern_value(patterns: dict, module: str):
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` rule: the value of the first pattern ``p`` with
    ``re.match(rf"(.*\\.)?({p})$", module)``, or None."""
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", module):
            return value
    return None


__all__ = ["PEFT", "DIFFUSERS_ATTN_PROCESSOR", "KOHYA", "FORMATS", "KOHYA_PREFIXES", "COMPONENT_PREFIXES", "UNSUPPORTED",
           "MARKERS", "detect_format", "check_supported", "select_component", "underscore_names", "alias_names",
           "parse_keys", "pattern_value"]
