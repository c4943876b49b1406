"""The `model` kind: a Fluxion model with its weight files, registered with `refiners_register_models`."""

IMPLEMENTATION = '''\
"""`$Class`: a model written as a tree of Fluxion layers, and its weight files. The skeleton is a two-layer
perceptron; replace it with your architecture and keep `tests/` passing."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields

import refiners_core.fluxion as fl
import torch
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.weights import WeightsError, load_tensors, read_metadata, save_tensors

CONFIG_KEY = "$name.config"
"""The safetensors metadata key holding the model's config, as JSON."""


@dataclass(frozen=True)
class ${Class}Config:
    in_features: int = 16
    hidden_features: int = 32
    out_features: int = 16


class $Class(fl.Chain):
    """Linear, SiLU, Linear: the layers read in the order they run."""

    def __init__(
        self,
        config: ${Class}Config | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        config = config or ${Class}Config()
        super().__init__(
            fl.Linear(config.in_features, config.hidden_features, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Linear(config.hidden_features, config.out_features, device=device, dtype=dtype),
        )
        self.config = config


def save_${package}(model: $Class, path: str | os.PathLike[str]) -> None:
    """Write the model's weights and config to a `.safetensors` file, atomically."""
    save_tensors(path, model.state_dict(), metadata={CONFIG_KEY: json.dumps(asdict(model.config))})


def load_${package}(
    source: str | os.PathLike[str], *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> $Class:
    """The model saved by `save_${package}` at `source`, on `device` in `dtype`.

    Raises FileNotFoundError, or WeightsError naming the file and the field or key at fault, before building
    anything when the config is bad.
    """
    metadata = read_metadata(source)
    raw = metadata.get(CONFIG_KEY)
    if raw is None:
        raise WeightsError(f"{source}: no {CONFIG_KEY!r} metadata: not a $name weights file")
    config = _config(source, raw)
    model = $Class(config, device=device, dtype=dtype)
    load_state_dict_checked(model, load_tensors(source), source=str(source))
    return model


def _config(source: str | os.PathLike[str], raw: str) -> ${Class}Config:
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as error:
        raise WeightsError(f"{source}: {CONFIG_KEY} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise WeightsError(f"{source}: {CONFIG_KEY} must be a JSON object")
    known = {field.name for field in fields(${Class}Config)}
    for key, value in values.items():  # pyright: ignore[reportUnknownVariableType]
        if key not in known:
            raise WeightsError(f"{source}: {CONFIG_KEY} has an unknown field {key!r}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise WeightsError(f"{source}: {CONFIG_KEY} field {key!r} must be a positive integer, got {value!r}")
    return ${Class}Config(**values)  # pyright: ignore[reportUnknownArgumentType]
'''

PLUGIN = '''\
"""The hooks of $distribution (entry point `$entry_point` in the `refiners` group)."""

from __future__ import annotations

from collections.abc import Callable

from refiners_core.plugins import ModelSpec, Reference, hookimpl


@hookimpl
def refiners_register_models(register: Callable[[ModelSpec], None]) -> None:
    # A reference ("module:attribute") is imported on first use: registering imports neither torch nor the model.
    register(
        ModelSpec(
            name="$name",
            loader=Reference("$package.model:load_${package}"),
            summary="$summary",
        )
    )
'''

TESTS = '''\
"""$Class's weight files load back through the registry, and bad files are refused naming the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from refiners_core.plugins import registry
from refiners_core.weights import WeightsError, save_tensors

from $package import $Class, ${Class}Config, save_${package}


def test_a_saved_model_loads_back_through_the_registry(tmp_path: Path) -> None:
    torch.manual_seed(0)  # pyright: ignore[reportUnknownMemberType]
    model = $Class(${Class}Config(in_features=3, hidden_features=5, out_features=2))
    save_${package}(model, tmp_path / "model.safetensors")
    x = torch.randn(4, 3)

    loaded = registry(reload=True).models["$name"].loader(tmp_path / "model.safetensors", dtype=torch.float64)

    assert loaded.config == model.config
    assert all(parameter.dtype == torch.float64 for parameter in loaded.parameters())
    torch.testing.assert_close(loaded(x.double()), model(x).double())


def test_a_file_without_the_config_is_refused_naming_it(tmp_path: Path) -> None:
    save_tensors(tmp_path / "other.safetensors", {"weight": torch.zeros(2)})

    with pytest.raises(WeightsError, match="other.safetensors: no '$name.config' metadata"):
        registry(reload=True).models["$name"].loader(tmp_path / "other.safetensors")


def test_weights_of_the_wrong_shape_are_refused_naming_the_key(tmp_path: Path) -> None:
    model = $Class(${Class}Config(in_features=3))
    save_${package}(model, tmp_path / "model.safetensors")
    tensors = dict(model.state_dict())
    tensors["Linear_1.weight"] = torch.zeros(7, 7)
    save_tensors(tmp_path / "model.safetensors", tensors, metadata={"$name.config": '{"in_features": 3}'})

    with pytest.raises(WeightsError, match="Linear_1.weight"):
        registry(reload=True).models["$name"].loader(tmp_path / "model.safetensors")
'''

MODULE = "model"
EXPORTS = ("$Class", "${Class}Config", "load_${package}", "save_${package}")
DEPENDENCIES: tuple[str, ...] = ()
