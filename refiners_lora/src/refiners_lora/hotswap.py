"""Hot-swap slots: LoRAs added, removed and replaced in a compiled model without recompiling it.

`LoraManager.enable_hotswap(max_rank, max_loras)`, called before `torch.compile`, injects on every layer a LoRA may
patch `max_loras` empty adapters ("slots") of rank `max_rank`, with zero weights and scale 0: the model's structure
is then fixed. Adding a LoRA writes its weights into the first free slot of each layer it patches (a lower rank is
padded with zeros, which adds exact zeros), removing one zeroes its slot, and changing a scale writes a buffer:
the compiled graph reads tensors that change in place and never sees a new module, so it is not recompiled.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

import refiners_core.fluxion as fl
from refiners_core.weights import WeightsError
from refiners_lora.adapter import LoraAdapter, LoraTarget
from refiners_lora.formats import ModuleLora


@dataclass
class HotswapSlots:
    """`max_loras` empty LoRA adapters of rank `max_rank` on each layer of `slots`; `owners[i]` holds slot i's LoRA."""

    max_rank: int
    max_loras: int
    slots: dict[LoraTarget, list[LoraAdapter]]
    owners: list[str | None] = field(default_factory=lambda: [])

    @classmethod
    def inject(cls, layers: list[LoraTarget], max_rank: int, max_loras: int) -> HotswapSlots:
        """Inject `max_loras` zero slots of rank `max_rank` on each layer (all or none)."""
        slots: dict[LoraTarget, list[LoraAdapter]] = {}
        injected: list[LoraAdapter] = []
        try:
            for layer in layers:
                stack: list[LoraAdapter] = []
                for _ in range(max_loras):
                    adapter = LoraAdapter(layer, rank=max_rank, scale=0.0)
                    _zero(adapter)
                    injected.append(adapter.inject())
                    stack.append(adapter)
                slots[layer] = stack
        except BaseException:
            for adapter in reversed(injected):
                adapter.eject()
            raise
        return cls(max_rank, max_loras, slots, [None] * max_loras)

    def eject(self) -> None:
        """Take every slot out: the layers are back as they were."""
        for stack in self.slots.values():
            for adapter in reversed(stack):
                adapter.eject()

    def check(self, name: str, source: str, plan: list[tuple[str, LoraTarget, ModuleLora]], *, replacing: bool) -> int:
        """The free slot for LoRA `name` (`replacing`: the slot it holds), after checking that every module fits.

        Raises WeightsError naming `source` and the limit for a rank above `max_rank` or a layer with no slot,
        ValueError when every slot is taken. Changes nothing.
        """
        for path, target, lora in plan:
            key = next(iter(lora.keys.values()))
            if "down" not in lora.tensors or "up" not in lora.tensors:
                raise WeightsError(
                    f"{source}: '{key}' is not a plain LoRA (down / up weights): it cannot be hot-swapped"
                )
            rank = lora.tensors["down"].shape[0]
            if rank > self.max_rank:
                raise WeightsError(
                    f"{source}: '{lora.keys['down']}' has rank {rank}, more than the hot-swap maximum rank "
                    f"{self.max_rank} (enable_hotswap(max_rank={self.max_rank}))"
                )
            if target not in self.slots:
                raise WeightsError(f"{source}: '{key}' patches layer `{path}`, which has no hot-swap slot")
        if replacing:
            return self.owners.index(name)
        if None not in self.owners:
            raise ValueError(
                f"cannot add LoRA {name!r} from {source}: all {self.max_loras} hot-swap slots are taken "
                f"(enable_hotswap(max_loras={self.max_loras})); remove one first"
            )
        return self.owners.index(None)

    @torch.no_grad()
    def fill(self, name: str, slot: int, plan: list[tuple[str, LoraTarget, ModuleLora]]) -> list[LoraAdapter]:
        """Write each module's weights into its layer's adapter of `slot` (zero-padded to `max_rank`) and give the
        slot to `name`; returns the adapters, in plan order, at scale 0 (the caller sets their scales)."""
        self.clear(slot)
        adapters: list[LoraAdapter] = []
        for _, target, lora in plan:
            adapter = self.slots[target][slot]
            down, up = adapter.lora.down, adapter.lora.up
            assert isinstance(down, (fl.Linear, fl.Conv2d)) and isinstance(up, (fl.Linear, fl.Conv2d))
            rank = lora.tensors["down"].shape[0]
            down.weight[:rank].copy_(lora.tensors["down"].reshape(down.weight[:rank].shape))
            up.weight[:, :rank].copy_(lora.tensors["up"].reshape(up.weight[:, :rank].shape))
            adapters.append(adapter)
        self.owners[slot] = name
        return adapters

    def clear(self, slot: int) -> None:
        """Zero every adapter of `slot` (weights and scale) and free it."""
        for stack in self.slots.values():
            _zero(stack[slot])
        self.owners[slot] = None


def hotswap_layers(model: nn.Module) -> list[LoraTarget]:
    """Every layer of `model` a LoRA can patch: its `fl.Linear` and ungrouped `fl.Conv2d` layers."""
    return [
        layer
        for layer in model.modules()
        if isinstance(layer, fl.Linear) or (isinstance(layer, fl.Conv2d) and layer.groups == 1)
    ]


@torch.no_grad()
def _zero(adapter: LoraAdapter) -> None:
    adapter.lora.down.weight.zero_()
    adapter.lora.up.weight.zero_()
    adapter.scale = 0.0
