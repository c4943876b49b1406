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
from refiners_lora.patterns import Pattern, PatternError, compile_patterns

Role = Literal["down", "up", "alpha"]
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
_PROCESSOR = re.compile(
    r"^(?P<attention>.+?)\.(?P<processor>processor\.)?(?P<projection>to_q|to_k|to_v|to_out)_lora\.(?P<role>down|up)\.weight$"
)
# The older diffusers keys name the projections after the attention processors; these are the modules they patch.
_UNET_PROJECTIONS = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_TEXT_PROJECTIONS = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


@dataclass
class ModuleLora:
    """The LoRA weights of one module, as the file names it, and their adapter family ("lora": down and up)."""

    module: str
    keys: dict[Role, str] = field(default_factory=lambda: {})
    tensors: dict[Role, torch.Tensor] = field(default_factory=lambda: {})
    family: str = "lora"

    @property
    def rank(self) -> int | None:
        """The rank of the update (the first dimension of the down weight); None without a down weight."""
        down = self.tensors.get("down")
        return None if down is None or down.ndim < 1 else down.shape[0]

    @property
    def alpha(self) -> float | None:
        """The alpha (the update is scaled by alpha / rank); None when there is none (alpha = rank) or it is not one
        number that was read (a tensor of another shape, or one on the meta device)."""
        alpha = self.tensors.get("alpha")
        if alpha is None or alpha.numel() != 1 or alpha.is_meta or alpha.is_complex() or alpha.dtype == torch.bool:
            return None
        return float(alpha.item())


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
        found = _classify(key)
        if found is None:
            continue
        classified[key] = found
        if found[0] is not None:
            examples.setdefault(found[0], key)
    if not examples:
        shown = ", ".join(f"'{key}'" for key in list(tensors)[:3]) or "none"
        raise WeightsError(
            f"{source}: not a LoRA file: no key ends in lora_down/lora_up, lora_A/lora_B or down/up weights "
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
    compiled: dict[str, list[tuple[Pattern, Any]]] = {}
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
            if field_name == "alpha_pattern":
                compiled[prefix] = patterns_compiled
    for module, lora in modules.items():
        if "alpha" in lora.tensors or "down" not in lora.tensors:
            continue
        prefix = max((p for p in configs if not p or module.startswith(f"{p}.")), key=len, default=None)
        if prefix is None:
            continue
        config, name = configs[prefix], module.removeprefix(f"{prefix}.") if prefix else module
        matched = next((value for pattern, value in compiled[prefix] if pattern.matches(name)), None)
        alpha = matched if matched is not None else config.get("lora_alpha", PEFT_DEFAULT_ALPHA)
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not _finite(alpha):
            raise WeightsError(
                f"{source}: its '{PEFT_METADATA_KEY}' metadata gives '{module}' the alpha {alpha!r}, "
                "not a finite number"
            )
        if config.get("use_rslora"):  # PEFT scales by alpha / sqrt(rank), which is (alpha * sqrt(rank)) / rank
            alpha *= math.sqrt(lora.tensors["down"].shape[0])
        lora.keys["alpha"] = f"{PEFT_METADATA_KEY} metadata ({prefix or 'no'} prefix)"
        lora.tensors["alpha"] = torch.tensor(float(alpha))


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _classify(key: str) -> tuple[Format | None, str, Role] | None:
    """(format, module name, role) of a key; the format is None for an `alpha`, which all formats share."""
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
