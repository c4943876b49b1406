"""The `--freeu` option of `refiners generate`: FreeU on the loaded model's UNet."""

from __future__ import annotations

from typing import Any

from refiners_core.checks import check_finite
from refiners_freeu.freeu import SD15_SCALES, FreeU

FREEU_METAVAR = "S1,S2,B1,B2"
FREEU_HELP = (
    "apply FreeU to the UNet with these factors, or 'default' for the SD1.5 values "
    f"({','.join(str(value) for value in SD15_SCALES.values())})"
)


def parse_freeu_scales(value: str) -> dict[str, float]:
    """`{"s1": ..., "s2": ..., "b1": ..., "b2": ...}` from `"S1,S2,B1,B2"` or `"default"`.

    Raises ValueError, quoting `value`, for anything else, NaN and infinite factors included.
    """
    if value.strip().lower() == "default":
        return dict(SD15_SCALES)
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
    """Inject FreeU into `model.unet` (an `SD1UNet`) with the factors of the one `--freeu` value.

    Raises ValueError naming the value at fault, or if `--freeu` is given more than once; TypeError if the model
    has no SD1.5 UNet.
    """
    validate_freeu_option(values)
    scales = parse_freeu_scales(values[0])
    FreeU(model.unet, **scales).inject()
