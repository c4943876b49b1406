"""Per-block scales of one LoRA: diffusers' `set_adapters` dictionaries and A1111's "LoRA Block Weight" lists.

Which block a layer belongs to comes from the model (`refiners_core.layer_blocks.LayerBlocks`), never from its
layer names. Two forms are read, each resolved to one multiplier per patched layer:

- a dictionary, as diffusers' `pipe.set_adapters(name, {...})` takes it: component -> scale, where a component is
  `unet`, `text_encoder` or `text_encoder_2` and a component left out keeps 1. A text encoder takes a number. The UNet
  takes a number, or `{"down": ..., "mid": ..., "up": ...}` (a section left out keeps 1): `mid` is a number (or a list
  of one); `down` / `up` is a number for all their blocks, a list of one number per transformer for all their blocks,
  or `{"block_<level>": number or list}` (a level left out keeps 1). As in diffusers, only the levels with
  transformers can be named; a transformer's scale also applies to the residual block of the same index, and a
  level's down- or upsampler takes the scale of its first transformer; the other layers (input and output
  convolutions, time embeddings, the middle block's residual blocks, levels without transformers) keep 1.
- a list of numbers in the order of the extension's blocks: `BASE` (every text encoder), `IN00`... (the input
  convolution, then each residual / transformer pair of each down level, then its downsampler), `M00` (the middle
  block), `OUT00`... (each pair of each up level, its upsampler with the last pair). The full form names every
  block (26 values for SD1.5, 20 for SDXL); the short form only `BASE`, the blocks holding a transformer and `M00`
  (17 for SD1.5, 12 for SDXL), and refuses a LoRA patching a block it leaves out. The time embeddings and the output
  convolution are in no block of the extension: they keep 1.
- the name of one of the extension's presets (`BLOCK_WEIGHT_PRESETS`, spelled as it spells them: "ALL", "INS",
  "ALL0.5"...). They are 17-value SD1.5 lists, which the extension applies to any model by block name, a block they
  do not name taking 0 (its `to26`): so here, on SD1.5 as on SDXL, where it ships no presets of its own.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any, cast

from torch import nn

from refiners_core.layer_blocks import LayerBlock, LayerBlocks

BlockScales = Mapping[str, Any] | Sequence[float] | str
"""A diffusers-style dictionary of scales per component and block, an A1111 block-weight list or preset name."""

PRESET_BLOCKS = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
"""The blocks of the extension's 17-value lists, in their order: those of its presets."""

BLOCK_WEIGHT_PRESETS: dict[str, tuple[float, ...]] = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1) + (0,) * 13,
    "IND": (1, 0, 0, 0, 1, 1, 1) + (0,) * 10,
    "INALL": (1,) * 7 + (0,) * 10,
    "MIDD": (1, 0, 0, 0) + (1,) * 8 + (0,) * 5,
    "OUTD": (1,) + (0,) * 7 + (1,) * 4 + (0,) * 5,
    "OUTS": (1,) + (0,) * 11 + (1,) * 5,
    "OUTALL": (1,) + (0,) * 7 + (1,) * 9,
    "ALL0.5": (0.5,) * 17,
}
"""The presets of sd-webui-lora-block-weight's default list (its `DEF_WEIGHT_PRESET`), values in `PRESET_BLOCKS`
order."""

_SECTIONS = ("down", "mid", "up")


def block_multipliers(model: nn.Module, paths: Sequence[str], scales: BlockScales, owner: str) -> list[float]:
    """The multiplier of each layer of `paths` (layer paths of `model`) under `scales`.

    Raises TypeError if `model` does not implement `LayerBlocks` or a value is not a number; ValueError naming the
    key (or list position) at fault for an unknown component, section, block or preset, a list of the wrong length,
    a NaN or infinite value, a layer of `paths` the model gives no block, or a short block-weight list for a LoRA that
    patches a block it leaves out. `owner` (e.g. "LoRA 'style'") starts every message.
    """
    if not isinstance(model, LayerBlocks):
        raise TypeError(
            f"{owner}: per-block scales need a model that tells the block of each layer "
            f"(refiners_core.layer_blocks.LayerBlocks); {type(model).__name__} does not"
        )
    blocks = dict(model.layer_blocks())
    for path in paths:
        if path not in blocks:
            raise ValueError(f"{owner}: layer `{path}` is in no block {type(model).__name__} names")
    targets = [blocks[path] for path in paths]
    if isinstance(scales, str):
        return _block_weight_list(_preset(scales, blocks.values(), owner), blocks.values(), paths, targets, owner)
    if isinstance(scales, Mapping):
        resolve = _dictionary(scales, blocks.values(), owner)
        return [resolve(block) for block in targets]
    if isinstance(scales, bytes) or not isinstance(scales, Sequence):  # pyright: ignore[reportUnnecessaryIsInstance]
        raise TypeError(f"{owner}: scale must be a number, a dict, a list of numbers or a preset name, got {scales!r}")
    return _block_weight_list(list(scales), blocks.values(), paths, targets, owner)


def block_weight_names(model: nn.Module, *, short: bool = False) -> list[str]:
    """The names of the A1111 "LoRA Block Weight" blocks of `model`, in list order: all of them, or (`short`) those of
    the short form. Raises TypeError if `model` does not implement `LayerBlocks`."""
    if not isinstance(model, LayerBlocks):
        raise TypeError(f"{type(model).__name__} does not tell the block of each layer (LayerBlocks)")
    return _block_weight_ids(list(dict.fromkeys(model.layer_blocks().values())), short=short)[0]


def _preset(name: str, blocks: Any, owner: str) -> list[object]:
    """The full-form block-weight list of preset `name` for a model of `blocks`: each block the preset names takes
    its value, any other 0, as the extension applies them."""
    if name not in BLOCK_WEIGHT_PRESETS:
        raise ValueError(f"{owner}: unknown block-weight preset {name!r} (known: {', '.join(BLOCK_WEIGHT_PRESETS)})")
    values = dict(zip(PRESET_BLOCKS, BLOCK_WEIGHT_PRESETS[name], strict=True))
    full, _ = _block_weight_ids(list(dict.fromkeys(blocks)), short=False)
    return [float(values.get(block, 0)) for block in full]


def _number(value: object, where: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {where} must be a number, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{owner}: {where} must be a finite number, got {value!r}")
    return float(value)


def _dictionary(scales: Mapping[str, Any], blocks: Any, owner: str) -> Any:
    """A function giving each layer block its multiplier under a diffusers-style dictionary."""
    all_blocks: list[LayerBlock] = list(blocks)
    components = sorted({block.component for block in all_blocks})
    for key in scales:
        if key not in components:
            raise ValueError(f"{owner}: unknown component {key!r} in the scales (this model has {components})")
    plain = {key: _number(value, key, owner) for key, value in scales.items() if key != "unet" or not _nested(value)}
    unet = scales.get("unet")
    levels = _levels_with_transformers(all_blocks)
    unet_scales = _unet(cast(Mapping[str, Any], unet), levels, owner) if _nested(unet) else None

    def resolve(block: LayerBlock) -> float:
        if block.component in plain:
            return plain[block.component]
        if block.component != "unet" or unet_scales is None:
            return 1.0
        if block.section == "mid":
            return unet_scales[("mid", None)][0] if block.kind == "attention" else 1.0
        values = unet_scales.get((block.section, block.level)) if block.section in ("down", "up") else None
        if values is None or block.index is None:
            return 1.0
        return values[0 if block.kind == "sampler" else block.index]

    return resolve


def _nested(value: object) -> bool:
    return isinstance(value, Mapping)


def _levels_with_transformers(blocks: list[LayerBlock]) -> dict[str, dict[int, int]]:
    """Section -> level -> its count of residual / transformer pairs, for the levels holding a transformer."""
    counts: dict[str, dict[int, int]] = {"down": {}, "up": {}}
    for block in blocks:
        if block.component == "unet" and block.section in counts and block.kind == "attention":
            assert block.level is not None and block.index is not None
            level = counts[block.section]
            level[block.level] = max(level.get(block.level, 0), block.index + 1)
    return counts


def _unet(
    scales: Mapping[str, Any], levels: dict[str, dict[int, int]], owner: str
) -> dict[tuple[Any, Any], list[float]]:
    """(section, level) -> one multiplier per residual / transformer pair; ("mid", None) -> [the middle's]."""
    for key in scales:
        if key not in _SECTIONS:
            raise ValueError(f"{owner}: unknown UNet section 'unet.{key}' in the scales (expected down, mid, up)")
    mid = scales.get("mid", 1.0)
    if isinstance(mid, Sequence) and not isinstance(mid, str):
        mid_values = list(cast(Sequence[object], mid))
        if len(mid_values) != 1:
            raise ValueError(f"{owner}: 'unet.mid' takes one scale, got a list of {len(mid_values)}")
        mid = mid_values[0]
    resolved: dict[tuple[Any, Any], list[float]] = {("mid", None): [_number(mid, "'unet.mid'", owner)]}
    for section in ("down", "up"):
        value = scales.get(section, 1.0)
        counts = levels[section]
        if isinstance(value, Mapping):
            per_level = cast(Mapping[str, Any], value)
            names = {f"block_{level}": level for level in counts}
            for key in per_level:
                if key not in names:
                    raise ValueError(
                        f"{owner}: unknown block 'unet.{section}.{key}' in the scales (the {section} blocks with "
                        f"transformers are {sorted(names)})"
                    )
        else:
            per_level = {f"block_{level}": value for level in counts}
        for level, count in counts.items():
            where = f"'unet.{section}.block_{level}'"
            entry = per_level.get(f"block_{level}", 1.0)
            if isinstance(entry, Sequence) and not isinstance(entry, str):
                items = list(cast(Sequence[object], entry))
                if len(items) == 1:
                    items = items * count
                if len(items) != count:
                    raise ValueError(
                        f"{owner}: {where} takes {count} scales (one per transformer) or one, got {len(items)}"
                    )
                values = [_number(item, f"{where}[{i}]", owner) for i, item in enumerate(items)]
            else:
                values = [_number(entry, where, owner)] * count
            resolved[(section, level)] = values
    return resolved


def _block_weight_ids(blocks: list[LayerBlock], *, short: bool) -> tuple[list[str], dict[LayerBlock, str]]:
    """The extension's block names in list order (all, or only those of the short form), and each block's name."""
    names: dict[LayerBlock, str] = {}
    order: list[str] = ["BASE"]
    unet = [block for block in blocks if block.component == "unet"]
    for block in blocks:
        if block.component != "unet":
            names[block] = "BASE"
    with_transformer: set[str] = {"BASE", "M00"}
    for section, prefix in (("down", "IN"), ("up", "OUT")):
        counter = 0
        if section == "down":
            order.append("IN00")
            counter = 1
            for block in unet:
                if block.section == "in":
                    names[block] = "IN00"
        levels = sorted({block.level for block in unet if block.section == section and block.level is not None})
        for level in levels:
            members = [block for block in unet if block.section == section and block.level == level]
            pairs = 1 + max(block.index or 0 for block in members if block.kind != "sampler")
            first = counter
            order.extend(f"{prefix}{first + index:02d}" for index in range(pairs))
            counter += pairs
            for block in members:
                if block.kind == "sampler":
                    continue
                assert block.index is not None
                name = f"{prefix}{first + block.index:02d}"
                names[block] = name
                if block.kind == "attention":
                    with_transformer.add(name)
            samplers = [block for block in members if block.kind == "sampler"]
            if samplers and section == "down":
                order.append(f"{prefix}{counter:02d}")
                for block in samplers:
                    names[block] = f"{prefix}{counter:02d}"
                counter += 1
            for block in samplers if section == "up" else []:
                names[block] = f"{prefix}{counter - 1:02d}"
        if section == "down":
            order.append("M00")
            for block in unet:
                if block.section == "mid":
                    names[block] = "M00"
    if short:
        order = [name for name in order if name in with_transformer]
    return order, names


def _block_weight_list(
    values: list[object], blocks: Any, paths: Sequence[str], targets: list[LayerBlock], owner: str
) -> list[float]:
    all_blocks: list[LayerBlock] = list(dict.fromkeys(blocks))
    full, names = _block_weight_ids(all_blocks, short=False)
    short, _ = _block_weight_ids(all_blocks, short=True)
    if len(values) not in (len(full), len(short)):
        raise ValueError(
            f"{owner}: a block-weight list of {len(values)} values; this model takes {len(short)} "
            f"({', '.join(short)}) or {len(full)} ({', '.join(full)})"
        )
    order = short if len(values) == len(short) else full
    weights = {
        name: _number(value, f"block weight {name} (position {i})", owner)
        for i, (name, value) in enumerate(zip(order, values, strict=True))
    }
    multipliers: list[float] = []
    for path, block in zip(paths, targets, strict=True):
        name = names.get(block)
        if name is None:
            multipliers.append(1.0)
        elif name in weights:
            multipliers.append(weights[name])
        else:
            raise ValueError(
                f"{owner}: layer `{path}` is in block {name}, which the {len(short)}-value list leaves out: give "
                f"{len(full)} values"
            )
    return multipliers
