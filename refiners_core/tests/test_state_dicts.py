"""`load_state_dict_checked`: foreign weights through an explicit key mapping, all or nothing."""

from __future__ import annotations

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.state_dicts import compose, invert, load_state_dict_checked
from refiners_core.weights import WeightsError

MAPPING = {
    "encoder.proj.weight": "Linear_1.weight",
    "encoder.proj.bias": "Linear_1.bias",
    "head.weight": "Linear_2.weight",
    "head.bias": "Linear_2.bias",
}


def _model() -> fl.Chain:
    return fl.Chain(fl.Linear(4, 8), fl.SiLU(), fl.Linear(8, 2))


def _file() -> dict[str, torch.Tensor]:
    return {
        "encoder.proj.weight": torch.randn(8, 4),
        "encoder.proj.bias": torch.randn(8),
        "head.weight": torch.randn(2, 8, 1, 1),  # a 1x1 convolution kernel for a linear layer
        "head.bias": torch.randn(2),
        "position_ids": torch.arange(4),
    }


def _snapshot(model: fl.Chain) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_tensors_load_through_the_mapping_and_convert_to_the_model_dtype() -> None:
    model = _model().to(torch.float64)
    tensors = _file()
    load_state_dict_checked(model, tensors, source="w.safetensors", mapping=MAPPING, ignore={"position_ids"})
    assert torch.equal(model.state_dict()["Linear_1.weight"], tensors["encoder.proj.weight"].double())
    assert torch.equal(model.state_dict()["Linear_2.weight"], tensors["head.weight"].reshape(2, 8).double())
    assert model.dtype == torch.float64


def test_a_shape_mismatch_names_file_key_layer_and_shapes_and_leaves_the_model_untouched() -> None:
    model = _model()
    before = _snapshot(model)
    tensors = {**_file(), "head.weight": torch.randn(3, 8)}
    with pytest.raises(WeightsError) as error:
        load_state_dict_checked(model, tensors, source="w.safetensors", mapping=MAPPING, ignore={"position_ids"})
    message = str(error.value)
    assert "w.safetensors" in message and "'head.weight' has shape (3, 8)" in message
    assert "`Chain.Linear_2`" in message and "expects (2, 8)" in message
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_an_unknown_key_is_named_and_nothing_is_loaded() -> None:
    model = _model()
    before = _snapshot(model)
    with pytest.raises(WeightsError, match=r"1 key\(s\) match no layer of Chain: 'position_ids'"):
        load_state_dict_checked(model, _file(), source="w.safetensors", mapping=MAPPING)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())


def test_a_missing_key_names_our_layer_and_the_file_key_expected() -> None:
    tensors = _file()
    del tensors["head.bias"]
    with pytest.raises(
        WeightsError, match=r"no weights for 1 key\(s\).*`Chain.Linear_2` \(Linear_2.bias, file key 'head.bias'\)"
    ):
        load_state_dict_checked(_model(), tensors, source="w.safetensors", mapping=MAPPING, ignore={"position_ids"})


def test_assigning_takes_the_file_tensors_into_a_meta_model() -> None:
    model = fl.Chain(fl.Linear(4, 8, device="meta"), fl.SiLU(), fl.Linear(8, 2, device="meta"))
    tensors = _file()
    load_state_dict_checked(
        model, tensors, source="w.safetensors", mapping=MAPPING, ignore={"position_ids"}, assign_to_device="cpu"
    )
    assert model.device == torch.device("cpu")
    assert model.state_dict()["Linear_1.weight"].data_ptr() == tensors["encoder.proj.weight"].data_ptr()
    assert all(parameter.requires_grad for parameter in model.parameters())
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_compose_and_invert_mappings() -> None:
    assert compose({"a": "b"}, {"b": "c"}) == {"a": "c"}
    with pytest.raises(KeyError, match="no entry for 'b'"):
        compose({"a": "b"}, {})
    assert invert({"a": "x", "b": "y"}) == {"x": "a", "y": "b"}
    with pytest.raises(ValueError, match="'a' and 'b' both map to 'x'"):
        invert({"a": "x", "b": "x"})
