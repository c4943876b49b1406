"""Read the LoRA file formats in use, telling them apart by their keys only (never by the file name).

- kohya / sd-scripts: `<name>.lora_down.weight`, `<name>.lora_up.weight`, optional `<name>.alpha`, where `<name>`
  is a flattened module path such as `lora_unet_down_blocks_0_resnets_0_conv1` (module names: `KOHYA`).
- diffusers / PEFT: `<module path>.lora_A.weight` / `.lora_B.weight`, or `.lora.down.weight` / `.lora.up.weight`
  (also `.lora_linear_layer.*`), optional `<module path>.alpha`; and the older attention-processor keys
  `<attention>.processor.to_q_lora.down.weight` (and `to_k`, `to_v`, `to_out`) of the UNet and
  `<self_attn>.to_q_lora.down.weight` of the text encoder (module names: `DIFFUSERS`).
- refiners: `<layer path>.down.weight`, `<layer path>.up.weight`, optional `<layer path>.alpha`, where the layer path
  is the one `named_modules` gives for our model: it works on any model, with no name mapping.

Without an alpha, alpha is the rank (the LoRA's factor alpha / rank is 1). A diffusers / PEFT safetensors file may
instead give its alphas in the `lora_adapter_metadata` entry of its metadata (the PEFT `LoraConfig` that diffusers'
`save_lora_weights` writes, its fields prefixed with `unet.`, `text_encoder.`... or not): `lora_alpha`,
`alpha_pattern` and `use_rslora` are honoured; an `.alpha` key, where present, wins. The keys of `alpha_pattern` and
`rank_pattern` are regular expressions from the file: they are matched in bounded time (`refiners_lora.patterns`).

LyCORIS and DoRA keys (`hada_*`, `lokr_*`, `lora_mid.weight`, `diff`, `diff_b`, `dora_scale`,
`lora_magnitude_vector`; `refiners_lora.families`) belong to no format: they take the format of the file's LoRA keys,
or, in a file of those keys only, the one their module names tell (kohya: `lora_*` names without dots; diffusers /
PEFT: `unet.`, `text_encoder*.`, `transformer.` or PEFT's `base_model.model.`, which is dropped; else refiners).
PEFT's LoHa / LoKr alpha (`alpha` in the `lora_adapter_metadata` entry) is honoured as `lora_alpha` is. A key of a
family refiners-lora does not apply (OFT, BOFT, GLoRA...) makes the whole file refused, naming the family.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

from refiners_core.module_names import DIFFUSERS, KOHYA
from refiners_core.weights import WeightsError
from refiners_lora.families import UNSUPPORTED_SUFFIXES
from refiners_lora.patterns import Pattern, PatternError, compile_patterns

Role = str
"""What a key holds for its module: "down", "up", "alpha", or a LyCORIS / DoRA role (`refiners_lora.families`)."""
Format = Literal["kohya", "diffusers", "refiners"]

PEFT_METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata entry where diffusers writes the PEFT `LoraConfig` of a LoRA (JSON)."""
PEFT_DEFAULT_ALPHA = 8
"""PEFT's `LoraConfig.lora_alpha` when a configuration gives none."""

CONVENTIONS: dict[Format, str | None] = {"kohya": KOHYA, "diffusers": DIFFUSERS, "refiners": None}
"""The module-name convention of each format (None: our own layer paths)."""

_SUFFIXES: tuple[tuple[Format, str, Role], ...] = (
    ("kohya", ".lora_down.weight", "down"),
    ("kohya", ".lora_up.weight", "up"),
    ("diffusers", ".lora_A.weight", "down"),
    ("diffusers", ".lora_B.weight", "up"),
    ("diffusers", ".lora.down.weight", "down"),
    ("diffusers", ".lora.up.weight", "up"),
    ("diffusers", ".lora_linear_layer.down.weight", "down"),
    ("diffusers", ".lora_linear_layer.up.weight", "up"),
)
_OWN_SUFFIXES: tuple[tuple[str, Role], ...] = ((".down.weight", "down"), (".up.weight", "up"))
_NEUTRAL_SUFFIXES: tuple[tuple[str, Role], ...] = (
    *((f".{role}", role) for role in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")),
    *((f".{role}", role) for role in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")),
    (".lokr_t2", "lokr_t2"),
    (".lora_mid.weight", "mid"),
    (".diff", "diff"),
    (".diff_b", "diff_b"),
    (".dora_scale", "dora_scale"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora_magnitude_vector.weight", "magnitude"),
)
PEFT_PREFIX = "base_model.model."
"""The prefix of every key of a state dict PEFT's `get_peft_model_state_dict` gives (dropped from module names)."""
_DIFFUSERS_PREFIXES = ("unet.", "text_encoder.", "text_encoder_2.", "transformer.")
_PROCESSOR = re.compile(
    r"^(?P<attention>.+?)\.(?P<processor>processor\.)?(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
# The older diffusers keys name the projections after the attention processors; these are the modules they patch.
_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class ModuleLora:
    """The LoRA weights of one module, as the file names it."""

    module: str
    keys: dict[Role, str] = field(default_factory=lambda: {})
    tensors: dict[Role, torch.Tensor] = field(default_factory=lambda: {})


@dataclass
class ParsedLora:
    """A LoRA file split per module: `modules` by file module name, and the keys of no recognised form."""

    format: Format
    modules: dict[str, ModuleLora]
    unknown: list[str]

    @property
    def convention(self) -> str | None:
        """The module-name convention (`KOHYA`, `DIFFUSERS`), or None for our own layer paths."""
        return CONVENTIONS[self.format]


def parse_lora(tensors: dict[str, torch.Tensor], source: str, metadata: dict[str, str] | None = None) -> ParsedLora:
    """Detect the format of a LoRA state dict from its keys and group its tensors per module.

    For a diffusers / PEFT LoRA, the alphas of the `lora_adapter_metadata` entry of `metadata` (the file's, see
    `refiners_core.weights.read_metadata`) are added to the modules without an `.alpha` key. Raises WeightsError
    naming `source` if no key is a LoRA weight, keys of two formats are mixed, or the metadata is not a valid PEFT
    configuration.
    """
    classified: dict[str, tuple[Format | None, str, Role]] = {}
    examples: dict[Format, str] = {}
    for key in tensors:
        family = next((name for suffix, name in UNSUPPORTED_SUFFIXES.items() if key.endswith(suffix)), None)
        if family is not None:
            raise WeightsError(
                f"{source}: '{key}' is a {family} weight, a family refiners-lora does not apply (it applies LoRA, "
                "LoCon, LoHa, LoKr, Tucker, full diffs and DoRA): nothing was loaded"
            )
        found = _classify(key)
        if found is None:
            continue
        classified[key] = found
        if found[0] is not None:
            examples.setdefault(found[0], key)
    if not examples and classified:
        examples[_neutral_format([module for _, module, _ in classified.values()])] = next(iter(classified))
    if not examples:
        shown = ", ".join(f"'{key}'" for key in list(tensors)[:3]) or "none"
        raise WeightsError(
            f"{source}: not a LoRA file: no key ends in lora_down/lora_up, lora_A/lora_B, down/up weights or a "
            "LyCORIS / DoRA weight "
            f"(first keys: {shown})"
        )
    if len(examples) > 1:
        mixed = ", ".join(f"{name} ('{key}')" for name, key in examples.items())
        raise WeightsError(f"{source}: keys of several LoRA formats are mixed: {mixed}")
    (lora_format,) = examples
    modules: dict[str, ModuleLora] = {}
    unknown: list[str] = []
    for key in tensors:
        found = classified.get(key)
        if found is None or found[0] not in (None, lora_format):
            unknown.append(key)
            continue
        _, module, role = found
        entry = modules.setdefault(module, ModuleLora(module))
        if role in entry.keys:
            raise WeightsError(f"{source}: '{key}' and '{entry.keys[role]}' are both the {role} weights of '{module}'")
        entry.keys[role] = key
        entry.tensors[role] = tensors[key]
    if lora_format == "diffusers" and metadata and PEFT_METADATA_KEY in metadata:
        _add_peft_alphas(modules, _peft_configs(metadata[PEFT_METADATA_KEY], source), source)
    return ParsedLora(lora_format, modules, unknown)


def _peft_configs(raw: str, source: str) -> dict[str, dict[str, Any]]:
    """Component prefix ("" for none) -> its PEFT configuration, from the JSON that diffusers writes."""
    try:
        config: object = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as error:
        raise WeightsError(f"{source}: its '{PEFT_METADATA_KEY}' metadata is not JSON: {error}") from error
    if not isinstance(config, dict):
        raise WeightsError(f"{source}: its '{PEFT_METADATA_KEY}' metadata is not a JSON object")
    configs: dict[str, dict[str, Any]] = {}
    for key, value in cast(dict[str, Any], config).items():
        prefix, _, name = key.rpartition(".")
        configs.setdefault(prefix, {})[name] = value
    return configs


def _add_peft_alphas(modules: dict[str, ModuleLora], configs: dict[str, dict[str, Any]], source: str) -> None:
    """Give each module without an alpha the one PEFT would use: its `alpha_pattern` entry, else `lora_alpha`.

    Every pattern key of every configuration is compiled first (`refiners_lora.patterns`): a key that could take
    unbounded time is refused before any matching starts.
    """
    compiled: dict[tuple[str, str], list[tuple[Pattern, Any]]] = {}
    for prefix, config in configs.items():
        for field_name in ("alpha_pattern", "rank_pattern"):
            patterns: object = config.get(field_name) or {}
            where = (
                f"{source}: its '{PEFT_METADATA_KEY}' metadata has a bad {f'{prefix}.' if prefix else ''}{field_name}"
            )
            if not isinstance(patterns, dict):
                raise WeightsError(f"{where}: a {type(patterns).__name__}, not an object")
            try:
                patterns_compiled = compile_patterns(cast(dict[str, Any], patterns))
            except PatternError as error:
                raise WeightsError(f"{where}: {error}") from error
            compiled[(prefix, field_name)] = patterns_compiled
    for module, lora in modules.items():
        if "alpha" in lora.tensors or not lora.tensors.keys() & _PEFT_ALPHA_ROLES:
            continue
        prefix = max((p for p in configs if not p or module.startswith(f"{p}.")), key=len, default=None)
        if prefix is None:
            continue
        config, name = configs[prefix], module.removeprefix(f"{prefix}.") if prefix else module
        matched = next((value for pattern, value in compiled[(prefix, "alpha_pattern")] if pattern.matches(name)), None)
        default = config.get("lora_alpha", config.get("alpha", PEFT_DEFAULT_ALPHA))  # LoHa / LoKr: `alpha`
        alpha = matched if matched is not None else default
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not _finite(alpha):
            raise WeightsError(
                f"{source}: its '{PEFT_METADATA_KEY}' metadata gives '{module}' the alpha {alpha!r}, "
                "not a finite number"
            )
        if (
            config.get("use_rslora") and "down" in lora.tensors
        ):  # PEFT scales by alpha / sqrt(rank), which is (alpha * sqrt(rank)) / rank
            alpha *= math.sqrt(lora.tensors["down"].shape[0])
        lora.keys["alpha"] = f"{PEFT_METADATA_KEY} metadata ({prefix or 'no'} prefix)"
        lora.tensors["alpha"] = torch.tensor(float(alpha))
        if "lokr_w2" in lora.tensors and "lokr_w1" in lora.tensors:  # PEFT scales even a whole LoKr by alpha / r
            matched_rank = next((r for pattern, r in compiled[(prefix, "rank_pattern")] if pattern.matches(name)), None)
            rank = matched_rank if matched_rank is not None else config.get("r", PEFT_DEFAULT_ALPHA)
            if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
                raise WeightsError(f"{source}: its '{PEFT_METADATA_KEY}' metadata gives '{module}' the rank {rank!r}")
            lora.tensors["lokr_w2"] = lora.tensors["lokr_w2"] * (float(alpha) / rank)


_PEFT_ALPHA_ROLES = {"down", "hada_w1_b", "lokr_w1", "lokr_w1_b", "lokr_w2_b"}  # the families PEFT gives an alpha


def _neutral_format(modules: list[str]) -> Format:
    """The format of a file of LyCORIS / DoRA keys only, from its module names."""
    if all(module.startswith("lora_") and "." not in module for module in modules):
        return "kohya"
    if any(module.startswith(_DIFFUSERS_PREFIXES) for module in modules):
        return "diffusers"
    return "refiners"


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _classify(key: str) -> tuple[Format | None, str, Role] | None:
    """(format, module name, role) of a key; the format is None for an `alpha` or a LyCORIS / DoRA weight, which all
    formats share. PEFT's `base_model.model.` prefix makes a diffusers key and is dropped."""
    if key.startswith(PEFT_PREFIX):
        found = _classify(key.removeprefix(PEFT_PREFIX))
        return None if found is None else ("diffusers", found[1], found[2])
    for suffix, role in _NEUTRAL_SUFFIXES:
        if key.endswith(suffix):
            return None, key.removesuffix(suffix), role
    if key.endswith(".alpha"):
        return None, key.removesuffix(".alpha"), "alpha"
    for lora_format, suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return lora_format, key.removesuffix(suffix), role
    if match := _PROCESSOR.match(key):
        projections = _UNET_PROJECTIONS if match["processor"] else _TEXT_PROJECTIONS
        role = "down" if match["role"] == "down" else "up"
        return "diffusers", f"{match['attention']}.{projections[match['projection']]}", role
    for suffix, role in _OWN_SUFFIXES:
        if key.endswith(suffix):
            return "refiners", key.removesuffix(suffix), role
    return None
