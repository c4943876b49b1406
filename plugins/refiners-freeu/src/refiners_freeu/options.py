"""The `--freeu` option of `refiners generate`: FreeU on the loaded model's UNet."""

from __future__ import annotations

from typing import Any

from refiners_core.checks import check_finite
from refiners_freeu.freeu import FreeU, default_scales
from refiners_freeu.scales import SD15_SCALES


def parse_freeu_scales(value: str, default: dict[str, float] = SD15_SCALES) -> dict[str, float]:
    """`{"s1": ..., "s2": ..., "b1": ..., "b2": ...}` from `"S1,S2,B1,B2"`, or a copy of `default` for `"default"`.

    Raises ValueError, quoting `value`, for anything else, NaN and infinite factors included.
    """
    if value.strip().lower() == "default":
        return dict(default)
    parts = value.split(",")
    try:
        numbers = [float(part) for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 4:
        raise ValueError(f"--freeu {value!r}: expected four comma-separated numbers S1,S2,B1,B2, or 'default'")
    names = ("s1", "s2", "b1", "b2")
    for name, part in zip(names, parts):
        check_finite(f"--freeu {value!r}: {name.upper()}", part.strip())
    return dict(zip(names, numbers))


def validate_freeu_option(values: list[str]) -> None:
    """Check the `--freeu` values before the model is loaded: given once, four finite numbers or 'default'.

    Raises ValueError naming the value at fault.
    """
    if len(values) != 1:
        raise ValueError(f"--freeu is given {len(values)} times ({', '.join(values)}): give it once")
    parse_freeu_scales(values[0])


def apply_freeu_option(model: Any, values: list[str]) -> None:
    """Inject FreeU into `model.unet` (an `SD1UNet` or `SDXLUNet`) with the factors of the one `--freeu` value
    (`default`: the model's, see `default_scales`).

    Raises ValueError naming the value at fault, or if `--freeu` is given more than once; TypeError if the model
    has no Stable Diffusion UNet.
    """
    validate_freeu_option(values)
    unet: Any = getattr(model, "unet", None)
    scales = parse_freeu_scales(values[0], default_scales(unet))
    FreeU(unet, **scales).inject()
