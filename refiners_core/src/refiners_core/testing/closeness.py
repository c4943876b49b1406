"""Compare outputs with a reference by relative error, the measure every parity test of this ecosystem states."""

from __future__ import annotations

import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference divided by the largest absolute value of `expected` (0 where both are 0).

    Both are compared in float64 on the CPU, so tensors of any float dtype and device can be compared. Raises
    ValueError if the shapes differ.
    """
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {tuple(actual.shape)} and expected {tuple(expected.shape)}")
    actual64 = actual.detach().to("cpu", torch.float64)
    expected64 = expected.detach().to("cpu", torch.float64)
    difference = float((actual64 - expected64).abs().max()) if actual.numel() else 0.0
    scale = float(expected64.abs().max()) if expected.numel() else 0.0
    if scale == 0.0:
        return 0.0 if difference == 0.0 else float("inf")
    return difference / scale


def assert_relative_close(
    actual: torch.Tensor,
    expected: torch.Tensor,
    tolerance: float = 1e-4,
    *,
    what: str = "output",
    allow_zero: bool = False,
) -> None:
    """Assert `relative_error(actual, expected) <= tolerance` and that `actual` is finite.

    The message names `what`, the error, the tolerance and the magnitudes, so a failing parity test says by how
    much it failed. A NaN or infinity in `actual` fails even where `expected` has one too, and so does an `expected`
    that is all zeros (the comparison would prove little) unless `allow_zero`.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    if not allow_zero and not bool(expected.detach().ne(0).any()):
        raise AssertionError(f"{what}: the expected tensor is all zeros; pass allow_zero=True if that is the point")
    if not bool(torch.isfinite(actual).all()):
        raise AssertionError(f"{what}: holds NaN or infinite values")
    error = relative_error(actual, expected)
    if not error <= tolerance:
        difference = float((actual.detach().double().cpu() - expected.detach().double().cpu()).abs().max())
        raise AssertionError(
            f"{what}: relative error {error:.3g} > {tolerance:.3g} (max abs difference {difference:.3g}, max abs "
            f"expected {float(expected.detach().double().abs().max()):.3g})"
        )


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, *, what: str = "output") -> None:
    """Assert the two tensors have the same shape, dtype and bits (NaNs in the same places count as equal)."""
    if actual.shape != expected.shape or actual.dtype != expected.dtype:
        raise AssertionError(
            f"{what}: {actual.dtype} {tuple(actual.shape)}, expected {expected.dtype} {tuple(expected.shape)}"
        )
    if not torch.equal(actual, expected) and not bool(
        (actual.isnan() & expected.isnan()).logical_or(actual == expected).all()
    ):
        raise AssertionError(
            f"{what}: not bit-identical (max abs difference {float((actual - expected).abs().max()):.3g})"
        )
