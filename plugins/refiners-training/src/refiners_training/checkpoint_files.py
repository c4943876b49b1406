"""What a checkpoint folder holds, read and checked whole before any of it is used.

`lora_weights.safetensors` holds the LoRA weights by name; `training_state.pt` (read with `weights_only=True`)
the step, the data position, the optimizer, the schedule, the gradient scaler and the random generators. A file
that is missing, unreadable (truncated, empty, not of its format), incomplete, of other shapes or dtype than the
configured LoRA's, of another step, or holding a NaN or an infinity is a CheckpointError naming the file.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file  # pyright: ignore[reportUnknownVariableType]
from torch import nn

from refiners_training.checkpoint import CheckpointError, checkpoint_step

LORA_WEIGHTS = "lora_weights.safetensors"
TRAINING_STATE = "training_state.pt"


def read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The weights and the training state of checkpoint `folder`, with what can be checked without the model:
    both files there and readable, the state complete and of the folder's step, every number finite.
    CheckpointError naming the file at fault; `check_fits` checks them against the LoRA."""
    weights_file, state_file = folder / LORA_WEIGHTS, folder / TRAINING_STATE
    for path in (weights_file, state_file):
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {path.name} is missing")
    try:
        tensors = load_file(weights_file)
    except Exception as error:  # safetensors raises its own error type for a damaged file
        raise CheckpointError(f"cannot read {weights_file}: {error}") from error
    try:
        state: object = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip, a bad pickle: torch raises several types
        raise CheckpointError(f"cannot read {state_file}: {error}") from error
    for key, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{weights_file}: '{key}' holds non-finite values (NaN or infinity)")
    return tensors, check_training_state(state_file, state, checkpoint_step(folder))


def check_fits(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    parameters: dict[str, nn.Parameter],
    rank: int,
) -> None:
    """CheckpointError naming the file of checkpoint `folder` unless its weights `tensors` are `parameters`' names,
    shapes and dtype, and the optimizer moments of its training `state` of their shapes (the LoRA's rank: `rank`)."""
    weights_file, state_file = folder / LORA_WEIGHTS, folder / TRAINING_STATE
    missing, unexpected = sorted(set(parameters) - set(tensors)), sorted(set(tensors) - set(parameters))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights_file} does not fit the configured LoRA (lora.layers, lora.train_text_encoder): "
            f"{len(missing)} weight(s) missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:1]})"
        )
    for key, parameter in parameters.items():
        tensor = tensors[key]
        if tensor.shape != parameter.shape:
            raise CheckpointError(
                f"{weights_file}: '{key}' has shape {tuple(tensor.shape)}, the configured LoRA "
                f"(lora.rank = {rank}) needs {tuple(parameter.shape)}"
            )
        if tensor.dtype != parameter.dtype:
            raise CheckpointError(f"{weights_file}: '{key}' is {tensor.dtype}, expected {parameter.dtype}")
    shapes = [parameter.shape for parameter in parameters.values()]
    for index, moments in typing.cast(dict[int, dict[str, Any]], state["optimizer"]["state"]).items():
        if not 0 <= index < len(shapes):
            raise CheckpointError(f"{state_file}: 'optimizer' holds a state for parameter {index!r}, not this LoRA's")
        for name, value in moments.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != shapes[index]:
                raise CheckpointError(
                    f"{state_file}: optimizer '{name}' of parameter {index} has shape {tuple(value.shape)}, "
                    f"the configured LoRA needs {tuple(shapes[index])}"
                )


TRAINING_STATE_KEYS = ("step", "position", "optimizer", "scheduler", "scaler", "rng")


def check_training_state(state_file: Path, state: object, step: int) -> dict[str, Any]:
    """`state` (the content of `state_file`) if it is a complete training state at `step`, every number in it
    finite; CheckpointError naming it otherwise."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{state_file} is not a training state (got a {type(state).__name__})")
    state = typing.cast(dict[str, Any], state)
    missing = [key for key in TRAINING_STATE_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{state_file} is incomplete: it lacks {', '.join(repr(key) for key in missing)}")
    for key in ("step", "position"):
        if not isinstance(state[key], int) or state[key] < 0:
            raise CheckpointError(f"{state_file}: '{key}' must be a non-negative integer, got {state[key]!r}")
    if state["step"] != step:
        raise CheckpointError(f"{state_file}: 'step' is {state['step']}, but the checkpoint is that of step {step}")
    optimizer, scheduler, rng = state["optimizer"], state["scheduler"], state["rng"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict):  # pyright: ignore[reportUnknownMemberType]
        raise CheckpointError(f"{state_file}: 'optimizer' is not an optimizer state")
    groups = optimizer.get("param_groups")  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    if not isinstance(groups, list) or not all(_is_param_group(group) for group in typing.cast(list[Any], groups)):
        raise CheckpointError(f"{state_file}: 'optimizer' holds no valid AdamW parameter groups")
    if not isinstance(scheduler, dict) or typing.cast(dict[str, Any], scheduler).get("last_epoch") != step:
        raise CheckpointError(f"{state_file}: 'scheduler' is not the learning-rate schedule of step {step}")
    for index, moments in typing.cast(dict[Any, Any], optimizer["state"]).items():
        if not isinstance(index, int) or not isinstance(moments, dict):
            raise CheckpointError(f"{state_file}: 'optimizer' holds a state for parameter {index!r}, not this LoRA's")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or "python" not in rng:  # pyright: ignore[reportUnknownMemberType]
        raise CheckpointError(f"{state_file}: 'rng' is not the random generators' state")
    try:
        where = _first_non_finite(state, "")
    except RecursionError:
        raise CheckpointError(f"{state_file} is not a training state: it is nested too deeply") from None
    if where is not None:
        raise CheckpointError(f"{state_file}: '{where}' holds non-finite values (NaN or infinity)")
    return state


def _is_param_group(group: object) -> bool:
    """Whether `group` is an AdamW parameter group: its parameter indices, and numbers for its hyperparameters."""
    if not isinstance(group, dict):
        return False
    group = typing.cast(dict[str, Any], group)
    numbers = all(
        isinstance(group.get(key), int | float) and not isinstance(group.get(key), bool)
        for key in ("lr", "eps", "weight_decay")
    )
    betas = group.get("betas")
    pair = isinstance(betas, tuple | list) and len(typing.cast(tuple[Any, ...], betas)) == 2
    params = group.get("params")
    return (
        numbers
        and pair
        and isinstance(params, list)
        and all(isinstance(index, int) for index in typing.cast(list[Any], params))
    )


def _first_non_finite(value: object, path: str) -> str | None:
    """The path (`optimizer.state.3.exp_avg`) of the first non-finite float or float tensor in `value`, or None."""
    if isinstance(value, torch.Tensor):
        finite = not value.is_floating_point() or bool(torch.isfinite(value).all())
        return None if finite else path
    if isinstance(value, float):
        return None if math.isfinite(value) else path
    if isinstance(value, dict):
        items = typing.cast(dict[Any, Any], value).items()
    elif isinstance(value, list | tuple):
        items = enumerate(typing.cast(list[Any], value))
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None
