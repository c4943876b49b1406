"""Read the LoRA file formats in use, telling them apart by their keys only (never by the file name).

- kohya / sd-scripts: `<name>.lora_down.weight`, `<name>.lora_up.weight`, optional `<name>.alpha`, where `<name>`
  is a flattened module path such as `lora_unet_down_blocks_0_resnets_0_conv1` (module names: `KOHYA`).
- diffusers / PEFT: `<module path>.lora_A.weight` / `.lora_B.weight`, or `.lora.down.weight` / `.lora.up.weight`
  (also `.lora_linear_layer.*`), optional `<module path>.alpha`; and the older attention-processor keys
  `<attention>.processor.to_q_lora.down.weight` (and `to_k`, `to_v`, `to_out`) of the UNet and
  `<self_attn>.to_q_lora.down.weight` of the text encoder (module names: `DIFFUSERS`).
- refiners: `<layer path>.down.weight`, `<layer path>.up.weight`, optional `<layer path>.alpha`, where the layer path
  is the one `named_modules` gives for our model: it works on any model, with no name mapping.

Without an alpha, alpha is the rank (the LoRA's factor alpha / rank is 1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from refiners_core.module_names import DIFFUSERS, KOHYA
from refiners_core.weights import WeightsError

Role = Literal["down", "up", "alpha"]
Format = Literal["kohya", "diffusers", "refiners"]

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


def parse_lora(tensors: dict[str, torch.Tensor], source: str) -> ParsedLora:
    """Detect the format of a LoRA state dict from its keys and group its tensors per module.

    Raises WeightsError naming `source` if no key is a LoRA weight, or keys of two formats are mixed.
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
    return ParsedLora(lora_format, modules, unknown)


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
