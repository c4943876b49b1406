"""`fl.Converter`: a chain's inputs moved to the device and dtype of its weights, as in Refiners 0.4."""

import pytest
import torch

import refiners_core.fluxion as fl


class Scaled(fl.Chain):
    """Converter, then a layer that needs its inputs on the weights' device and dtype."""

    def __init__(self, converter: fl.Converter) -> None:
        super().__init__(converter, fl.Linear(2, 2))


def test_float32_inputs_are_cast_to_the_dtype_of_the_weights_and_follow_later_moves() -> None:
    model = Scaled(fl.Converter()).to(dtype=torch.float64)
    assert model(torch.ones(1, 2)).dtype == torch.float64
    model.to(dtype=torch.bfloat16)
    assert model(torch.ones(1, 2)).dtype == torch.bfloat16


def test_inputs_are_moved_to_the_device_of_the_weights() -> None:
    model = Scaled(fl.Converter()).to(device="meta")
    converter = model.layer("Converter", fl.Converter)
    assert converter(torch.ones(1, 2)).device.type == "meta"
    assert model(torch.ones(1, 2)).device.type == "meta"


def test_set_dtype_false_keeps_the_dtype_and_set_device_false_keeps_the_device() -> None:
    model = Scaled(fl.Converter(set_dtype=False)).to(dtype=torch.float64)
    assert model.layer("Converter")(torch.ones(1, 2)).dtype == torch.float32
    with pytest.raises(RuntimeError):
        model(torch.ones(1, 2))  # what the Converter is there to prevent
    on_meta = Scaled(fl.Converter(set_device=False)).to(device="meta", dtype=torch.float64)
    kept = on_meta.layer("Converter")(torch.ones(1, 2))
    assert kept.device.type == "cpu" and kept.dtype == torch.float64


def test_several_inputs_are_converted_integers_keep_their_dtype_and_other_values_pass() -> None:
    chain = fl.Chain(fl.Converter(), fl.Linear(2, 2)).to(dtype=torch.float16)
    converter = chain.layer("Converter", fl.Converter)
    tokens = torch.tensor([1, 2])
    floats, ids, label = converter(torch.ones(2), tokens, "text")
    assert floats.dtype == torch.float16 and ids.dtype == torch.int64 and torch.equal(ids, tokens)
    assert label == "text"


def test_a_converter_without_parent_or_whose_parent_has_no_weights_raises_naming_it() -> None:
    with pytest.raises(LookupError, match="Converter has no parent"):
        fl.Converter()(torch.ones(1))
    chain = fl.Chain(fl.Chain(fl.Converter(), fl.SiLU()), fl.Linear(2, 2))
    with pytest.raises(LookupError, match=r"Converter at `Chain\.Chain\.Converter` .* `Chain\.Chain`, which holds no"):
        chain(torch.ones(1, 2))


def test_repr_shows_the_options() -> None:
    assert repr(fl.Converter(set_dtype=False)) == "Converter(set_device=True, set_dtype=False)"
