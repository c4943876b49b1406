"""Check that a model came back exactly as it was: after an adapter's ejection, a refused file, a removed LoRA."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A clone of every tensor of `model.state_dict()`, in its order, to check later with `assert_state_unchanged`."""
    return {key: tensor.detach().clone() for key, tensor in model.state_dict().items()}


def assert_state_unchanged(model: nn.Module, before: Mapping[str, torch.Tensor]) -> None:
    """Assert `model.state_dict()` has the keys of `before` in the same order, and every tensor the same dtype and
    values bit for bit; the message names the first key that differs."""
    after = model.state_dict()
    assert list(after) == list(before), "the state_dict keys changed"
    for key, tensor in before.items():
        assert after[key].dtype == tensor.dtype and torch.equal(after[key], tensor), key


@dataclass(frozen=True)
class Original:
    """What a model was before adapters went in: its state dict (cloned), the types of its modules in order, and the
    outputs of a run of it. `assert_restored` checks that all of it came back, bit for bit."""

    state: dict[str, torch.Tensor]
    module_types: list[type[nn.Module]]
    outputs: tuple[torch.Tensor, ...]

    @staticmethod
    def of(model: nn.Module, run: Callable[[], tuple[torch.Tensor, ...]]) -> Original:
        """Record `model` and the outputs of `run()` (which runs it)."""
        state = state_snapshot(model)
        return Original(state, [type(module) for module in model.modules()], run())

    def assert_restored(self, model: nn.Module, run: Callable[[], tuple[torch.Tensor, ...]]) -> None:
        """Assert `model` has the recorded module types and state dict (`assert_state_unchanged`), and `run()` gives
        the recorded outputs bit for bit."""
        assert [type(module) for module in model.modules()] == self.module_types, "the model's modules changed"
        assert_state_unchanged(model, self.state)
        outputs = run()
        assert len(outputs) == len(self.outputs)
        for index, (output, expected) in enumerate(zip(outputs, self.outputs, strict=True)):
            assert torch.equal(output, expected), f"output {index} differs"


def outputs_after_each(run: Callable[[], torch.Tensor], steps: Iterable[Callable[[], object]]) -> list[torch.Tensor]:
    """`run()` after each of `steps` in turn (an adapter ejected, a LoRA removed...), to check that each mattered."""
    outputs: list[torch.Tensor] = []
    for step in steps:
        step()
        outputs.append(run())
    return outputs
