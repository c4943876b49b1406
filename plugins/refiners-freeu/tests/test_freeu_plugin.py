"""The installed plugin: its registry entries and its `--freeu` option of `refiners generate`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from refiners_core.plugins import registry
from refiners_freeu import SD15_SCALES, FreeUAdapter
from refiners_freeu.options import apply_freeu_option, parse_freeu_scales
from refiners_sd15.unet import ConcatenateSkip, SD1UNet, UNetConfig


def small_unet() -> SD1UNet:
    return SD1UNet(
        UNetConfig(
            block_out_channels=(32, 64, 64),
            cross_attention_levels=(True, True, False),
            attention_head_dim=4,
            cross_attention_dim=24,
            norm_num_groups=8,
        )
    )


def test_plugin_registers_the_adapter_and_the_generate_option() -> None:
    loaded = registry(reload=True)
    (record,) = [record for record in loaded.plugins if record.distribution == "refiners-freeu"]
    assert record.status == "ok", record.error
    assert record.entry_point == "freeu = refiners_freeu.plugin"
    assert record.adapters == ("freeu",)
    assert record.generate_options == ("--freeu",)
    assert record.to_json()["adapters"] == ["freeu"]  # as `refiners plugins --json` shows it

    unet = small_unet()
    skip = unet.ensure_find(ConcatenateSkip)
    adapter = loaded.adapters["freeu"].create(skip, backbone_scale=1.2, skip_scale=0.9).inject()
    assert isinstance(adapter, FreeUAdapter) and unet.ensure_find(FreeUAdapter) is adapter
    adapter.eject()
    with pytest.raises(TypeError, match="cannot wrap a SD1UNet"):
        loaded.adapters["freeu"].create(unet)
    assert loaded.generate_options["--freeu"].applies_to("sd15")


def test_freeu_option_values() -> None:
    assert parse_freeu_scales("default") == SD15_SCALES
    assert parse_freeu_scales("0.6,0.4,1.1,1.3") == {"s1": 0.6, "s2": 0.4, "b1": 1.1, "b2": 1.3}
    for bad in ["0.6,0.4,1.1", "a,b,c,d", ""]:
        with pytest.raises(ValueError, match=f"--freeu '{bad}'"):
            parse_freeu_scales(bad)


def test_freeu_option_injects_freeu_into_the_unet() -> None:
    model = SimpleNamespace(unet=small_unet())
    apply_freeu_option(model, ["0.6,0.4,1.1,1.3"])
    adapters = list(model.unet.layers(FreeUAdapter))
    assert len(adapters) == 6
    assert (adapters[0].skip_scale, adapters[0].backbone_scale) == (0.6, 1.1)
    assert (adapters[-1].skip_scale, adapters[-1].backbone_scale) == (0.4, 1.3)
    with pytest.raises(ValueError, match="given 2 times"):
        apply_freeu_option(SimpleNamespace(unet=small_unet()), ["default", "default"])


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["nan,0.4,1.1,1.3"], "S1 must be a finite number, got 'nan'"),
        (["0.6,inf,1.1,1.3"], "S2 must be a finite number, got 'inf'"),
        (["0.6,0.4,-inf,1.3"], "B1 must be a finite number"),
        (["0.6,0.4,1.1,1e999"], "B2 must be a finite number"),
        (["0.6,0.4"], "expected four comma-separated numbers"),
        (["default", "default"], "--freeu is given 2 times"),
    ],
)
def test_freeu_option_is_validated_before_the_model_is_loaded(values: list[str], message: str) -> None:
    validate = registry().generate_options["--freeu"].validate
    assert validate is not None
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        validate(values)
    model = SimpleNamespace(unet=small_unet())
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        apply_freeu_option(model, values)
    assert not list(model.unet.layers(FreeUAdapter))
