"""`LoraManager`: load LoRA files onto a model, several at once, each with its own scale, all or nothing."""

from __future__ import annotations

import copy
import logging
import math
import numbers
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeGuard, cast
from weakref import WeakKeyDictionary

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.fluxion.adapters import AdapterError
from refiners_core.weights import WeightsError, load_tensors, read_metadata, save_tensors
from refiners_lora.adapter import LoraAdapter, LoraTarget
from refiners_lora.block_weights import BlockScales, block_multipliers
from refiners_lora.delta_adapter import DeltaAdapter, snapshot_biases
from refiners_lora.export import lora_state_dict
from refiners_lora.families import recognize
from refiners_lora.formats import Format, ModuleLora
from refiners_lora.hotswap import HotswapSlots, hotswap_layers
from refiners_lora.planning import PLAIN_ROLES, plan_lora, resolve_layer

logger = logging.getLogger(__name__)

LoraSource = str | os.PathLike[str] | dict[str, torch.Tensor]
AnyAdapter = LoraAdapter | DeltaAdapter
"""A plain LoRA's adapter, or a LyCORIS / DoRA one (`refiners_lora.delta_adapter`)."""


@dataclass
class _Loaded:
    """One named LoRA: its adapters (in injection order), each with its alpha / rank, and the user's scale."""

    adapters: list[AnyAdapter]
    factors: list[float]
    scale: float | BlockScales
    paths: list[str]  # the layer path of each adapter's target, relative to the model


@dataclass
class _State:
    loras: dict[str, _Loaded] = field(default_factory=lambda: {})
    fused_weights: dict[LoraTarget, torch.Tensor] | None = None  # target -> its weight before fusing
    hotswap: HotswapSlots | None = None  # the slots of `enable_hotswap`
    fused_biases: dict[LoraTarget, torch.Tensor] = field(default_factory=lambda: {})  # the biases full diffs change


_STATES: WeakKeyDictionary[nn.Module, _State] = WeakKeyDictionary()


class LoraManager:
    """Add (or create), rescale, remove, fuse, unfuse and save named LoRAs on `model`.

    Every manager of the same model shares its state, so `LoraManager(model).names` always tells what is loaded.
    A LoRA's effective update of a layer's weight is `scale * alpha / rank * up @ down`.

    Files may be kohya, diffusers / PEFT or refiners LoRAs (see `refiners_lora.formats`), each module a LoRA, LoCon,
    LoHa, LoKr, Tucker LoCon or full diff, with or without DoRA (see `refiners_lora.families`); the first two need a
    model that names its layers in their convention (`refiners_core.module_names.ForeignModuleNames`), the last
    works on any model. `state_dict` and `save` write a plain LoRA (LoRA / LoCon) in any of the three formats.

    While the LoRAs are fused (`fuse()`), `add`, `remove` and `set_scale` raise RuntimeError: call `unfuse()` first.
    `set_scale` also takes per-block scales (`refiners_lora.block_weights`); `enable_hotswap` makes room for LoRAs to
    come and go in a compiled model without recompiling it (`refiners_lora.hotswap`).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state = _STATES.setdefault(model, _State())

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the LoRAs loaded, in the order they were added."""
        return tuple(self._state.loras)

    @property
    def is_fused(self) -> bool:
        """Whether the LoRAs are baked into the model's weights."""
        return self._state.fused_weights is not None

    def scale(self, name: str) -> float | BlockScales:
        """The scale of LoRA `name` (per-block scales as given to `set_scale`). Raises KeyError for an unknown name."""
        return self._get(name).scale

    def add(self, name: str, path_or_state_dict: LoraSource, scale: float = 1.0, *, strict: bool = True) -> list[str]:
        """Load a LoRA file (safetensors or torch) or state dict under `name`, with `scale`.

        Every key is checked before anything changes: with `strict` (the default), a key that matches no layer
        raises; with `strict=False` such keys are skipped, logged and returned. Returns the skipped keys (empty
        when every key was used).

        Raises ValueError if `name` is empty or taken or `scale` is NaN or infinite, TypeError if `scale` is not a
        number, FileNotFoundError for a missing file, WeightsError naming the file for an unreadable or non-LoRA
        file, a LoRA made for another base model (e.g. SD1.5's given to SDXL: `refiners_lora.base_models`), a value
        that is not a tensor, a key that matches no layer (strict), a layer that is not a Linear or
        Conv2d, a shape that does not fit (naming the key, layer path, expected and found shapes), a rank of 0,
        weights that are not floating point or not finite, or an alpha that is not a finite number; RuntimeError
        while fused. On any error the model is left exactly as it was and `name` is not added.
        """
        self._check_not_fused("add")
        self._check_name(name)
        _check_number(scale, "scale", f"LoRA {name!r}")
        source, tensors, metadata = _read(name, path_or_state_dict)
        plan, skipped = self._plan(tensors, source, strict=strict, metadata=metadata)
        factors = [_factor(lora) for _, _, lora in plan]
        for (_, _, lora), factor in zip(plan, factors, strict=True):
            if not _fits_float32(scale * factor):
                raise WeightsError(
                    f"{source}: '{lora.keys['alpha']}' with scale {scale} gives the factor {scale * factor}, beyond "
                    "float32"
                )
        hotswap = self._state.hotswap
        if hotswap is not None:
            adapters = hotswap.fill(name, hotswap.check(name, source, plan, replacing=False), plan)
            for adapter, factor in zip(adapters, factors, strict=True):
                adapter.scale = scale * factor
        else:
            adapters = [_build(target, lora, scale) for _, target, lora in plan]
            _inject_all(adapters)
        self._state.loras[name] = _Loaded(list[AnyAdapter](adapters), factors, scale, [path for path, _, _ in plan])
        if skipped:
            logger.warning(
                "LoRA %r: %d key(s) of %s match no layer and were skipped: %s", name, len(skipped), source, skipped
            )
        return skipped

    def create(
        self,
        name: str,
        layers: Iterable[str],
        rank: int,
        alpha: float | None = None,
        scale: float = 1.0,
        *,
        dtype: torch.dtype | None = None,
    ) -> dict[str, LoraAdapter]:
        """Inject a new, trainable LoRA on the layers at the paths `layers` (as `named_modules` gives them).

        Each layer must be an `fl.Linear` or an `fl.Conv2d` (LoCon). `down` starts random (kaiming-uniform, like
        PEFT and kohya) and `up` at zero, so outputs are unchanged. The LoRA is registered under `name` exactly
        like a loaded one (update `scale * alpha / rank * up @ down`; `alpha=None` means alpha = rank), so
        `set_scale`, `remove`, `fuse`, `state_dict` and `save` apply to it. `dtype` defaults to each layer's.

        Returns layer path -> adapter: train `adapter.lora.parameters()` (the model's own weights are left as
        they are, `requires_grad` included: freeze them yourself). Raises ValueError if `name` is empty or
        taken, `rank < 1`, `alpha` or `scale` is NaN or infinite, `layers` is empty, names a layer twice or has a
        path with no layer (naming it); TypeError for a `rank`, `alpha` or `scale` that is not a number, or naming
        a path whose layer is not a Linear or ungrouped Conv2d; RuntimeError while fused. On any error the model is
        left exactly as it was and `name` is not added.
        """
        self._check_not_fused("create")
        if self._state.hotswap is not None:
            raise RuntimeError(f"cannot create LoRA {name!r} while hot-swap is enabled: call disable_hotswap() first")
        self._check_name(name)
        if isinstance(rank, bool) or not isinstance(rank, int):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"LoRA {name!r}: rank must be an integer, got {rank!r}")
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        _check_number(scale, "scale", f"LoRA {name!r}")
        if alpha is not None:
            _check_number(alpha, "alpha", f"LoRA {name!r}")
        paths = [layers] if isinstance(layers, str) else list(layers)
        if not paths:
            raise ValueError(f"LoRA {name!r}: no layer paths given")
        model_name = type(self.model).__name__
        targets: list[LoraTarget] = []
        seen: dict[int, str] = {}
        for path in paths:
            layer = resolve_layer(self.model, path)
            if layer is None:
                raise ValueError(f"LoRA {name!r}: {model_name} has no layer at path {path!r}")
            if not isinstance(layer, (fl.Linear, fl.Conv2d)):
                raise TypeError(
                    f"LoRA {name!r}: layer `{model_name}.{path}` is a {type(layer).__name__}: LoRA patches Linear "
                    "and Conv2d layers only"
                )
            if isinstance(layer, fl.Conv2d) and layer.groups != 1:
                raise TypeError(f"LoRA {name!r}: layer `{model_name}.{path}` is a grouped convolution: not supported")
            if id(layer) in seen:
                raise ValueError(f"LoRA {name!r}: layer paths {seen[id(layer)]!r} and {path!r} are the same layer")
            seen[id(layer)] = path
            targets.append(layer)
        factor = 1.0 if alpha is None else alpha / rank
        adapters = [LoraAdapter(target, rank=rank, scale=scale * factor, dtype=dtype) for target in targets]
        for adapter in adapters:
            down = adapter.lora.down
            assert isinstance(down, (fl.Linear, fl.Conv2d))
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
        _inject_all(list(adapters))
        self._state.loras[name] = _Loaded(list(adapters), [factor] * len(adapters), scale, paths)
        return dict(zip(paths, adapters, strict=True))

    def state_dict(self, name: str, format: Format = "refiners") -> dict[str, torch.Tensor]:
        """The weights of LoRA `name` (loaded or created), as `add` reads them back.

        `format` is "refiners" (our layer paths, on any model), "kohya" (`lora_unet_*` / `lora_te_*` names with
        `lora_down`, `lora_up` and `alpha`) or "diffusers" (PEFT's `unet.*` / `text_encoder.*` names with `lora_A`
        and `lora_B`, alpha / rank baked into `lora_B`); the last two are what kohya tools and diffusers'
        `load_lora_weights` read. Tensors are copies in the LoRA's dtype; the scale set with `add` / `set_scale` is
        not included. Raises KeyError for an unknown name, ValueError for an unknown format or, for kohya and
        diffusers, a model that does not name its layers that way or a LoRA'd layer with no such name (naming its
        path).
        """
        loaded = self._get(name)
        for path, adapter in zip(loaded.paths, loaded.adapters, strict=True):
            if isinstance(adapter, DeltaAdapter):
                raise ValueError(
                    f"cannot write LoRA {name!r}: its update of `{path}` is a {adapter.delta.recognized.description}, "
                    "and only plain LoRAs are written"
                )
        plain = [adapter for adapter in loaded.adapters if isinstance(adapter, LoraAdapter)]
        adapters = list(zip(loaded.paths, plain, loaded.factors, strict=True))
        return lora_state_dict(self.model, adapters, format, name)

    def save(self, name: str, path: str | os.PathLike[str], format: Format = "refiners") -> None:
        """Write LoRA `name` to the `.safetensors` file `path` in `format` (see `state_dict`), atomically.

        The file is written to a temporary file beside it, flushed to disk and renamed: an error never leaves a
        partial file, and an existing file is replaced only once the new one is complete. Raises what
        `state_dict` raises (before any file is touched), FileNotFoundError naming the folder if it does not
        exist, WeightsError if `path` does not end in `.safetensors`.
        """
        tensors = self.state_dict(name, format)
        folder = Path(path).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"cannot save LoRA {name!r} to {path}: no folder {folder}")
        save_tensors(path, tensors, metadata={"format": "pt"})

    def set_scale(self, name: str, scale: float | BlockScales) -> None:
        """Change the scale of LoRA `name`, without reading its file again.

        `scale` is a number, or per-block scales (`refiners_lora.block_weights`): a diffusers `set_adapters`
        dictionary such as `{"unet": {"down": 0.5, "mid": 1.0, "up": [0.0, 1.0, 1.0]}, "text_encoder": 0.8}`, or an
        A1111 "LoRA Block Weight" list (17 or 26 values for SD1.5, 12 or 20 for SDXL) or the name of one of its
        presets ("ALL", "INS", "OUTD"..., `refiners_lora.block_weights.BLOCK_WEIGHT_PRESETS`). Raises KeyError for an
        unknown name, TypeError if a scale is not a number, ValueError if it is NaN or infinite or for a bad key,
        length or preset name (naming it), RuntimeError while fused; on any error the scales are left as they were.
        """
        self._check_not_fused("set_scale")
        loaded = self._get(name)
        if (
            isinstance(scale, Mapping)
            or _is_preset_name(scale)
            or (isinstance(scale, Sequence) and not isinstance(scale, (str, bytes)))
        ):
            multipliers = block_multipliers(self.model, loaded.paths, scale, f"LoRA {name!r}")
        else:
            _check_number(scale, "scale", f"LoRA {name!r}")
            multipliers = [float(cast(float, scale))] * len(loaded.adapters)
        if not all(_fits_float32(m * factor) for m, factor in zip(multipliers, loaded.factors, strict=True)):
            raise ValueError(f"LoRA {name!r}: scale {scale!r} times its alpha / rank is beyond float32")
        for adapter, multiplier, factor in zip(loaded.adapters, multipliers, loaded.factors, strict=True):
            adapter.scale = multiplier * factor
        loaded.scale = copy.deepcopy(scale)  # the caller's dict may change afterwards

    def remove(self, name: str) -> None:
        """Take LoRA `name` out: the layers it patched are back, with their weights untouched.

        Adapters of the LoRA that were already ejected by hand (`adapter.eject()`) are left as they are. Raises
        KeyError for an unknown name, RuntimeError while fused, or if an adapter cannot be ejected because the model
        was edited around it (naming its layer): then nothing is ejected and the LoRA stays registered.
        """
        self._check_not_fused("remove")
        loaded = self._get(name)
        hotswap = self._state.hotswap
        if hotswap is not None:
            hotswap.clear(hotswap.owners.index(name))
        else:
            _eject_all([adapter for adapter in loaded.adapters if adapter.is_injected], f"remove LoRA {name!r}")
        del self._state.loras[name]

    def enable_hotswap(self, max_rank: int, max_loras: int, layers: Iterable[str] | None = None) -> None:
        """Make room for up to `max_loras` LoRAs of rank up to `max_rank`, to add, remove and replace them in a
        compiled model without recompiling it (`refiners_lora.hotswap`). Call it before `torch.compile`.

        Every layer of `layers` (paths; default: every Linear and ungrouped Conv2d of the model) gets `max_loras`
        empty slots, which cost their rank's compute at every step. From then on `add` fills a free slot, `remove`
        empties one, `replace` swaps a slot's LoRA; `create` and `fuse` are refused until `disable_hotswap()`.
        Raises TypeError or ValueError for a bad `max_rank` / `max_loras` (below 1), ValueError for a path with no
        Linear or Conv2d (naming it), RuntimeError if LoRAs are loaded, hot-swap is already enabled, or fused.
        """
        if self.is_fused:
            raise RuntimeError("cannot enable hot-swap while the LoRAs are fused: call unfuse() first")
        for argument, value in (("max_rank", max_rank), ("max_loras", max_loras)):
            if isinstance(value, bool) or not isinstance(value, int):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise TypeError(f"enable_hotswap: {argument} must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"enable_hotswap: {argument} must be at least 1, got {value}")
        if self._state.hotswap is not None:
            raise RuntimeError("hot-swap is already enabled: call disable_hotswap() first to change its limits")
        if self._state.loras:
            raise RuntimeError(f"enable_hotswap() before adding LoRAs: remove {', '.join(map(repr, self.names))} first")
        targets: list[LoraTarget]
        if layers is None:
            targets = hotswap_layers(self.model)
        else:
            targets = []
            for path in [layers] if isinstance(layers, str) else layers:
                layer = resolve_layer(self.model, path)
                if not isinstance(layer, (fl.Linear, fl.Conv2d)) or (
                    isinstance(layer, fl.Conv2d) and layer.groups != 1
                ):
                    raise ValueError(f"enable_hotswap: {type(self.model).__name__} has no Linear or Conv2d at {path!r}")
                targets.append(layer)
        self._state.hotswap = HotswapSlots.inject(list(dict.fromkeys(targets)), max_rank, max_loras)

    def disable_hotswap(self) -> None:
        """Take the hot-swap slots out: the model is back as it was before `enable_hotswap`. Raises RuntimeError
        while LoRAs are loaded. Does nothing if hot-swap is not enabled."""
        if self._state.hotswap is None:
            return
        if self._state.loras:
            raise RuntimeError(f"cannot disable hot-swap: remove {', '.join(map(repr, self.names))} first")
        self._state.hotswap.eject()
        self._state.hotswap = None

    def replace(
        self, name: str, path_or_state_dict: LoraSource, scale: float = 1.0, *, strict: bool = True
    ) -> list[str]:
        """Put another LoRA file in the hot-swap slot of LoRA `name`, keeping the name: in a compiled model, with no
        recompilation. The new file is checked fully first (as `add` does): on any error LoRA `name` stays as it
        was. Returns the skipped keys (see `add`). Raises what `add` raises, KeyError for an unknown name,
        RuntimeError if hot-swap is not enabled.
        """
        hotswap = self._state.hotswap
        if hotswap is None:
            raise RuntimeError(f"cannot replace LoRA {name!r}: hot-swap is not enabled (see enable_hotswap)")
        self._get(name)
        _check_number(scale, "scale", f"LoRA {name!r}")
        source, tensors, metadata = _read(name, path_or_state_dict)
        plan, skipped = self._plan(tensors, source, strict=strict, metadata=metadata)
        factors = [_factor(lora) for _, _, lora in plan]
        if not all(_fits_float32(scale * factor) for factor in factors):
            raise WeightsError(f"{source}: scale {scale} times its alpha / rank is beyond float32")
        adapters = hotswap.fill(name, hotswap.check(name, source, plan, replacing=True), plan)
        for adapter, factor in zip(adapters, factors, strict=True):
            adapter.scale = scale * factor
        self._state.loras[name] = _Loaded(list[AnyAdapter](adapters), factors, scale, [path for path, _, _ in plan])
        return skipped

    @torch.no_grad()
    def fuse(self) -> None:
        """Add every loaded LoRA's update into the weights of its layers and take the adapters out, for speed.

        The weights as they were are kept, so that `unfuse()` restores them bit for bit. Does nothing if already
        fused.
        """
        if self.is_fused:
            return
        if self._state.hotswap is not None:
            raise RuntimeError("cannot fuse while hot-swap is enabled: call disable_hotswap() first")
        adapters = self._adapters()
        ejected = next((adapter for adapter in adapters if not adapter.is_injected), None)
        if ejected is not None:
            loaded = next(name for name, lora in self._state.loras.items() if ejected in lora.adapters)
            raise RuntimeError(
                f"cannot fuse: the adapter of LoRA {loaded!r} on `{ejected.target.get_path()}` was ejected by hand; "
                f"inject it again or remove({loaded!r}) first"
            )
        saved = _snapshot(list(dict.fromkeys(adapter.target for adapter in adapters)))
        biases = snapshot_biases(list(adapters))
        for adapter in adapters:
            target = adapter.target
            if isinstance(adapter, DeltaAdapter):  # from the weight before fusing, as unfused (DoRA depends on it)
                target.weight.add_(adapter.weight_delta(saved[target]))
                if (bias := adapter.delta.bias(target.bias)) is not None and target.bias is not None:
                    target.bias.add_(bias)
            else:
                target.weight.add_(_delta(adapter))
        for adapter in reversed(adapters):
            adapter.eject()
        self._state.fused_weights, self._state.fused_biases = saved, biases

    @torch.no_grad()
    def unfuse(self) -> None:
        """Put back the weights from before `fuse()` exactly, and the LoRA adapters. Does nothing if not fused."""
        saved = self._state.fused_weights
        if saved is None:
            return
        for target, weight in saved.items():
            target.weight.copy_(weight)
        for target, bias in self._state.fused_biases.items():
            assert target.bias is not None
            target.bias.copy_(bias)
        for adapter in self._adapters():
            adapter.inject()
        self._state.fused_weights, self._state.fused_biases = None, {}

    def _adapters(self) -> list[AnyAdapter]:
        return [adapter for loaded in self._state.loras.values() for adapter in loaded.adapters]

    def _get(self, name: str) -> _Loaded:
        if name not in self._state.loras:
            loaded = ", ".join(repr(n) for n in self._state.loras) or "none"
            raise KeyError(f"no LoRA named {name!r} (loaded: {loaded})")
        return self._state.loras[name]

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not name:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"a LoRA name must be a non-empty string, got {name!r}")
        if name in self._state.loras:
            raise ValueError(f"a LoRA named {name!r} is already loaded; remove it first or pick another name")

    def _plan(
        self, tensors: dict[str, torch.Tensor], source: str, *, strict: bool, metadata: dict[str, str]
    ) -> tuple[list[tuple[str, LoraTarget, ModuleLora]], list[str]]:
        """(layer path, layer, module LoRA) of every module `plan_lora` can apply, and the keys that match no layer;
        raises WeightsError for the first problem, or for unmatched keys when `strict` (or nothing matched)."""
        found = plan_lora(self.model, tensors, source, metadata)
        refused = found.refused
        if refused:
            raise WeightsError(refused[0].message)
        plan: list[tuple[str, LoraTarget, ModuleLora]] = []
        for module in found.applicable:
            assert module.path is not None and isinstance(module.layer, (fl.Linear, fl.Conv2d))
            plan.append((module.path, module.layer, module.lora))
        skipped = found.unmatched
        if skipped and (strict or not plan):
            shown = ", ".join(f"'{key}'" for key in skipped[:10]) + (" ..." if len(skipped) > 10 else "")
            hint = " (pass strict=False to load the others)" if plan else ""
            model_name = type(self.model).__name__
            raise WeightsError(f"{source}: {len(skipped)} key(s) match no layer of {model_name}{hint}: {shown}")
        return plan, skipped

    def _check_not_fused(self, action: str) -> None:
        if self.is_fused:
            raise RuntimeError(f"cannot {action} a LoRA while the LoRAs are fused: call unfuse() first")


def _read(name: str, path_or_state_dict: LoraSource) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """(source, tensors, metadata) of a LoRA file or state dict; raises WeightsError for a value that is no tensor."""
    if isinstance(path_or_state_dict, dict):
        source, tensors = f"LoRA state dict {name!r}", path_or_state_dict
        for key, value in tensors.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise WeightsError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        return source, tensors, {}
    metadata = read_metadata(Path(path_or_state_dict))  # the header first: it may refuse the file early
    return str(path_or_state_dict), load_tensors(Path(path_or_state_dict)), metadata


def _inject_all(adapters: list[AnyAdapter]) -> None:
    """Inject every adapter, or none: on an error, the ones already in are taken out again."""
    injected: list[AnyAdapter] = []
    try:
        for adapter in adapters:
            injected.append(adapter.inject())
    except BaseException:
        for adapter in reversed(injected):
            adapter.eject()
        raise


def _eject_all(adapters: list[AnyAdapter], action: str) -> None:
    """Eject every adapter (last first), or none: on an error, the ones already out are injected again."""
    ejected: list[tuple[AnyAdapter, fl.Chain | None]] = []
    try:
        for adapter in reversed(adapters):
            parent = adapter.parent
            adapter.eject()
            ejected.append((adapter, parent))
    except AdapterError as error:
        for adapter, parent in reversed(ejected):
            adapter.inject(parent)
        raise RuntimeError(f"cannot {action}: {error}; nothing was ejected") from error


def _check_number(value: object, argument: str, owner: str) -> None:
    """Raise TypeError unless `value` is a real number (not a bool), ValueError if it is NaN, infinite or beyond
    float32 (the LoRA's scale is a float32 buffer)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{owner}: {argument} must be a number, got {value!r}")
    if not _fits_float32(float(value)):
        raise ValueError(f"{owner}: {argument} must be a finite number, got {value!r}")


def _is_preset_name(scale: object) -> TypeGuard[str]:
    """Whether `scale` is a string to read as a block-weight preset's name: any but a number written as text (a
    mistake for the number, refused as such)."""
    if not isinstance(scale, str):
        return False
    try:
        float(scale)
    except ValueError:
        return True
    return False


def _fits_float32(value: float) -> bool:
    return math.isfinite(value) and abs(value) <= torch.finfo(torch.float32).max


def _build(target: LoraTarget, lora: ModuleLora, scale: float) -> AnyAdapter:
    """An adapter on `target` holding the file's down and up weights (reshaped, converted to the target's dtype), or
    for a LyCORIS / DoRA module, a `DeltaAdapter` holding its tensors (in the target's dtype)."""
    if not lora.tensors.keys() <= PLAIN_ROLES:
        recognized = recognize(lora.tensors, lora.keys)
        return DeltaAdapter(target, recognized, lora.tensors, scale * recognized.outer_factor)
    down, up = lora.tensors["down"], lora.tensors["up"]
    adapter = LoraAdapter(target, rank=down.shape[0], scale=scale * _factor(lora))
    with torch.no_grad():
        for layer, tensor in ((adapter.lora.down, down), (adapter.lora.up, up)):
            assert isinstance(layer, (fl.Linear, fl.Conv2d))
            layer.weight.copy_(tensor.reshape(layer.weight.shape))
    return adapter


def _factor(lora: ModuleLora) -> float:
    """alpha / rank (1 without an alpha); for a LyCORIS / DoRA module, the factor of the user's scale."""
    if not lora.tensors.keys() <= PLAIN_ROLES:
        return recognize(lora.tensors, lora.keys).outer_factor
    alpha = lora.tensors.get("alpha")
    rank = lora.tensors["down"].shape[0]
    return 1.0 if alpha is None else float(alpha.item()) / rank


def _snapshot(targets: list[LoraTarget]) -> dict[LoraTarget, torch.Tensor]:
    """A copy of each target's weight, as views of one buffer per device and dtype.

    One large allocation instead of one per layer: hundreds of separate copies held in the C heap change how
    the allocator serves the big temporary buffers of a forward pass afterwards (oneDNN's weight reorders on
    the CPU), which made every fused step page-fault gigabytes and run 1.3-1.7x slower than the plain model.
    """
    groups: dict[tuple[torch.device, torch.dtype], list[LoraTarget]] = {}
    for target in targets:
        groups.setdefault((target.weight.device, target.weight.dtype), []).append(target)
    saved: dict[LoraTarget, torch.Tensor] = {}
    for (device, dtype), members in groups.items():
        buffer = torch.empty(sum(target.weight.numel() for target in members), device=device, dtype=dtype)
        offset = 0
        for target in members:
            weight = target.weight
            saved[target] = buffer[offset : offset + weight.numel()].view_as(weight).copy_(weight)
            offset += weight.numel()
    return saved


def _delta(adapter: LoraAdapter) -> torch.Tensor:
    """`scale * up @ down` in the shape of the target's weight (for a convolution: the composed kernel)."""
    down, up = adapter.lora.down, adapter.lora.up
    assert isinstance(down, (fl.Linear, fl.Conv2d)) and isinstance(up, (fl.Linear, fl.Conv2d))
    down_weight, up_weight = down.weight, up.weight.flatten(1)
    delta = torch.einsum("or,r...->o...", up_weight, down_weight)
    return delta.mul_(adapter.scale).to(adapter.target.weight.dtype)
