"""`check_adapter`: what every adapter of this ecosystem promises, checked on a model.

An adapter (`refiners_core.fluxion.adapters.Adapter`) is put into a model without editing the model's code and
taken out again. Whoever writes one, in this repository or in a third-party plugin, owes its users the same
guarantees; this module checks them all on a model and inputs the author chooses, so a plugin's test suite needs one
call instead of re-deriving them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from refiners_core.fluxion.adapters import Adapter
from refiners_core.fluxion.chain import Chain
from refiners_core.testing.closeness import assert_bitwise_equal, assert_relative_close, relative_error
from refiners_core.testing.dynamo import fail_on_recompile, fresh_dynamo

AdapterFactory = Callable[[Chain], "Adapter[Any] | Sequence[Adapter[Any]]"]
"""Builds the adapter(s) for a model, not yet injected: `lambda model: MyAdapter(model.layer("Linear_2"), 2.0)`."""

Run = Callable[[Chain], torch.Tensor]
"""Computes the model's output on fixed inputs: `lambda model: model(x)`, setting any context it needs first."""


@dataclass
class AdapterCheckReport:
    """What `check_adapter` checked, and what it could not (with the reason), in order."""

    checked: list[str] = field(default_factory=list[str])
    skipped: list[str] = field(default_factory=list[str])


def check_adapter(
    factory: AdapterFactory,
    model: Chain,
    run: Run | Sequence[torch.Tensor],
    *,
    wrong_target: Callable[[Chain], object] | None = None,
    wrong_target_names: str | None = None,
    scale: float | None = 0.5,
    compile: bool = True,
    fused_tolerance: float = 1e-5,
    dtype: torch.dtype = torch.float64,
    run_moved: bool = True,
) -> AdapterCheckReport:
    """Check that the adapter(s) `factory(model)` keep the promises of every adapter of this ecosystem.

    `run` is the model's forward on fixed inputs (a callable `run(model) -> Tensor`, or the inputs themselves,
    given to `model(*inputs)`); it must be deterministic. Checked, raising AssertionError with what broke:

    1. Building the adapters leaves the model as it was (`state_dict`, layer objects, output).
    2. Injected, they change nothing but the output: afterwards every adapter `is_injected`.
    3. A structural copy of the adapted model gives the same output, and ejecting the copy's adapters gives the
       original output without touching the adapted model (a copy adapts independently).
    4. No adapter layer holds a tensor as a plain attribute (`.to()` would leave it behind); `model.to(dtype)`
       moves every parameter and buffer of the model and of the adapters (and to CUDA when there is one); with
       `run_moved`, the model then runs in `dtype` (the floating-point tensors passed to the model's forward are
       cast; set it False when `run` feeds the model tensors another way, such as through its context) within
       1e-4 of the output; moving back gives the same output bit for bit.
    5. With `scale` (None to skip) set on every adapter that has a settable `scale`, the output is the one its
       eager forward gives; with `compile`, `torch.compile(model, fullgraph=True)` (the eager backend) captures
       the adapted model without graph breaks and gives the eager output, and the scale change runs without
       recompiling.
    6. Adapters with `fuse()` and `unfuse()`: the fused output is within `fused_tolerance` (relative) of the
       unfused one, and unfusing restores the `state_dict` and output bit for bit.
    7. Ejected (in reverse order), the model has its original `state_dict`, the same layer objects at the same
       paths, and its original output, bit for bit.
    8. `wrong_target(model)`, when given, builds the adapter on a layer it cannot adapt: it must raise, leave
       the model as it was and, with `wrong_target_names`, say that text (the layer's path or type) in its message.

    Returns an `AdapterCheckReport` listing what was checked and skipped (fuse not offered, no CUDA...).
    """
    forward = _as_run(run)
    report = AdapterCheckReport()
    original = _Snapshot.of(model, forward)
    _expect(_Snapshot.of(model, forward).output_equals(original), "the model's output is not deterministic")

    adapters = _as_list(factory(model))
    original.assert_same(_Snapshot.of(model, forward), "after the adapters were built (before inject)")
    report.checked.append("building leaves the model unchanged")

    for adapter in adapters:
        adapter.inject()
    for adapter in adapters:
        _expect(adapter.is_injected, f"{_name(adapter)}: not injected after inject()")
    adapted = _Snapshot.of(model, forward)
    _expect(bool(torch.isfinite(adapted.output).all()), "the adapted model's output holds NaN or infinite values")
    report.checked.append("inject")

    _check_structural_copy(model, forward, adapted, original)
    report.checked.append("a structural copy adapts independently")

    _check_moves(model, adapters, forward, adapted, dtype, report, run_moved=run_moved)

    scalable = [adapter for adapter in adapters if _has_settable_scale(adapter)]
    if scale is None or not scalable:
        report.skipped.append("scale: no adapter has a settable `scale`" if scale is not None else "scale: skipped")
        rescaled = None
    else:
        with _scaled(scalable, scale):
            rescaled = forward(model)
        _expect(bool(torch.isfinite(rescaled).all()), f"output at scale {scale} holds NaN or infinite values")
        report.checked.append("scale")
    if compile:
        _check_compile(model, forward, adapted.output, scalable, scale, rescaled)
        report.checked.append("torch.compile without graph break" + (", scale without recompile" if scalable else ""))
    else:
        report.skipped.append("torch.compile: skipped")

    fusable = [adapter for adapter in adapters if callable(getattr(adapter, "fuse", None))]
    if fusable:
        for adapter in fusable:
            adapter.fuse()  # type: ignore[attr-defined]
        assert_relative_close(forward(model), adapted.output, fused_tolerance, what="fused output")
        for adapter in reversed(fusable):
            adapter.unfuse()  # type: ignore[attr-defined]
        adapted.assert_same(_Snapshot.of(model, forward), "after fuse() then unfuse()", layers=False)
        report.checked.append("fuse / unfuse")
    else:
        report.skipped.append("fuse: not offered")

    for adapter in reversed(adapters):
        adapter.eject()
    original.assert_same(_Snapshot.of(model, forward), "after eject")
    report.checked.append("eject restores the model")

    if wrong_target is not None:
        try:
            wrong_target(model)
        except Exception as error:  # noqa: BLE001 - any error type is fine, its message is what is checked
            message = str(error)
            if wrong_target_names is not None:
                _expect(
                    wrong_target_names in message,
                    f"the wrong-target error does not name {wrong_target_names!r}: {type(error).__name__}: {message}",
                )
        else:
            raise AssertionError("the adapter accepted a wrong target without an error")
        original.assert_same(_Snapshot.of(model, forward), "after the refused wrong target")
        report.checked.append("a wrong target is refused")
    else:
        report.skipped.append("wrong target: not given")
    return report


@dataclass
class _Snapshot:
    state: dict[str, torch.Tensor]
    layers: list[tuple[str, nn.Module]]
    output: torch.Tensor

    @staticmethod
    def of(model: Chain, forward: Run) -> _Snapshot:
        with torch.no_grad():
            output = forward(model).detach().clone()
        state = {key: value.detach().clone() for key, value in model.state_dict().items()}
        layers: list[tuple[str, nn.Module]] = list(model.named_modules(remove_duplicate=False))  # pyright: ignore[reportUnknownArgumentType]
        return _Snapshot(state, layers, output)

    def output_equals(self, other: _Snapshot) -> bool:
        return self.output.shape == other.output.shape and bool(torch.equal(self.output, other.output))

    def assert_same(self, other: _Snapshot, when: str, *, layers: bool = True) -> None:
        missing, extra = self.state.keys() - other.state.keys(), other.state.keys() - self.state.keys()
        _expect(
            not missing and not extra,
            f"{when}: state_dict keys differ (missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]})",
        )
        for key, value in self.state.items():
            assert_bitwise_equal(other.state[key], value, what=f"{when}: state_dict[{key!r}]")
        if layers:
            for (name, layer), (other_name, other_layer) in zip(self.layers, other.layers, strict=False):
                _expect(
                    name == other_name and layer is other_layer,
                    f"{when}: the layer at `{name}` was replaced (now `{other_name}`: {type(other_layer).__name__})",
                )
            _expect(
                len(self.layers) == len(other.layers),
                f"{when}: {len(other.layers)} layers, expected {len(self.layers)}",
            )
        assert_bitwise_equal(other.output, self.output, what=f"{when}: output")


def _check_structural_copy(model: Chain, forward: Run, adapted: _Snapshot, original: _Snapshot) -> None:
    copy = model.structural_copy()
    with torch.no_grad():
        assert_bitwise_equal(forward(copy), adapted.output, what="structural copy of the adapted model: output")
    injected = [layer for layer in copy.modules() if isinstance(layer, Adapter) and layer.is_injected]
    for adapter in reversed(injected):
        adapter.eject()
    with torch.no_grad():
        assert_bitwise_equal(forward(copy), original.output, what="structural copy with its adapters ejected: output")
    adapted.assert_same(_Snapshot.of(model, forward), "after ejecting a structural copy's adapters")


def _check_moves(
    model: Chain,
    adapters: list[Adapter[Any]],
    forward: Run,
    adapted: _Snapshot,
    dtype: torch.dtype,
    report: AdapterCheckReport,
    *,
    run_moved: bool,
) -> None:
    home = next((p for p in model.parameters() if p.is_floating_point()), None)
    if home is None:
        report.skipped.append(".to(): the model has no floating-point parameter")
        return
    home_device, home_dtype = home.device, home.dtype
    for adapter in adapters:
        layers: list[tuple[str, nn.Module]] = list(adapter.named_modules()) if isinstance(adapter, nn.Module) else []  # pyright: ignore[reportUnknownArgumentType]
        for path, layer in layers:
            for name, value in vars(layer).items():
                _expect(
                    not isinstance(value, torch.Tensor),
                    f"{_name(adapter)}: `{path or 'self'}.{name}` is a tensor held as a plain attribute, which .to() "
                    "does not move: register it as a parameter or a buffer",
                )
    moves: list[tuple[torch.device, torch.dtype]] = [(home_device, dtype)]
    if torch.cuda.is_available() and home_device.type != "cuda":
        moves.append((torch.device("cuda"), home_dtype))
    else:
        report.skipped.append(".to(device): no other device")
    for device, moved_dtype in moves:
        model.to(device=device, dtype=moved_dtype)
        try:
            for owner, tensors in _tensors(model, adapters):
                for name, tensor in tensors:
                    _expect(
                        tensor.device.type == device.type, f".to({device}): {owner} {name} stayed on {tensor.device}"
                    )
                    _expect(
                        not tensor.is_floating_point() or tensor.dtype == moved_dtype,
                        f".to({moved_dtype}): {owner} {name} stayed {tensor.dtype}",
                    )
            if run_moved and device == home_device:
                _run_moved(model, forward, adapted.output, moved_dtype)
        finally:
            model.to(device=home_device, dtype=home_dtype)
        report.checked.append(f".to({device.type}, {str(moved_dtype).removeprefix('torch.')}) moves the adapters")
    adapted.assert_same(_Snapshot.of(model, forward), "after .to() and back", layers=False)


def _run_moved(model: Chain, forward: Run, expected: torch.Tensor, dtype: torch.dtype) -> None:
    def cast(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            arg.to(dtype) if isinstance(arg, torch.Tensor) and arg.is_floating_point() else arg for arg in args
        )

    handle = model.register_forward_pre_hook(cast)
    try:
        with torch.no_grad():
            output = forward(model)
    except Exception as error:
        raise AssertionError(
            f"after .to({dtype}), the adapted model fails: {type(error).__name__}: {_first_line(error)}"
        ) from error
    finally:
        handle.remove()
    _expect(output.dtype == dtype, f"after .to({dtype}), the adapted model outputs {output.dtype}")
    assert_relative_close(output, expected, 1e-4, what=f"adapted output after .to({dtype})")


def _tensors(model: Chain, adapters: list[Adapter[Any]]) -> Iterator[tuple[str, Iterator[tuple[str, torch.Tensor]]]]:
    yield "model", model.named_parameters()
    yield "model", model.named_buffers()
    for adapter in adapters:
        if isinstance(adapter, nn.Module):
            yield _name(adapter), adapter.named_parameters()
            yield _name(adapter), adapter.named_buffers()


def _check_compile(
    model: Chain,
    forward: Run,
    eager: torch.Tensor,
    scalable: list[Adapter[Any]],
    scale: float | None,
    rescaled: torch.Tensor | None,
) -> None:
    with fresh_dynamo(), torch.no_grad():
        compiled: Any = torch.compile(model, backend="eager", fullgraph=True)  # pyright: ignore[reportUnknownMemberType]
        try:
            output = forward(compiled)
        except Exception as error:
            raise AssertionError(
                f"torch.compile(fullgraph=True) cannot capture the adapted model: "
                f"{type(error).__name__}: {_first_line(error)}"
            ) from error
        assert_relative_close(output, eager, 1e-6, what="compiled adapted model: output")
        if scale is None or rescaled is None or not scalable:
            return
        with _scaled(scalable, scale):
            try:
                with fail_on_recompile():
                    output = forward(compiled)
            except Exception as error:
                raise AssertionError(
                    f"changing the scale recompiles the adapted model: {_first_line(error)}"
                ) from error
        assert_relative_close(output, rescaled, 1e-6, what=f"compiled output at scale {scale}")


@contextlib.contextmanager
def _scaled(adapters: list[Adapter[Any]], scale: float) -> Generator[None]:
    previous = [float(getattr(adapter, "scale")) for adapter in adapters]  # noqa: B009
    for adapter in adapters:
        setattr(adapter, "scale", scale)  # noqa: B010
    try:
        yield
    finally:
        for adapter, value in zip(adapters, previous, strict=True):
            setattr(adapter, "scale", value)  # noqa: B010


def _has_settable_scale(adapter: object) -> bool:
    attribute = getattr(type(adapter), "scale", None)
    return isinstance(attribute, property) and attribute.fset is not None


def _as_run(run: Run | Sequence[torch.Tensor]) -> Run:
    if callable(run):
        return run
    inputs = tuple(run)
    return lambda model: model(*inputs)


def _as_list(adapters: Adapter[Any] | Sequence[Adapter[Any]]) -> list[Adapter[Any]]:
    listed = [adapters] if isinstance(adapters, Adapter) else list(adapters)
    _expect(bool(listed), "the factory built no adapter")
    for adapter in listed:
        _expect(isinstance(adapter, Adapter), f"the factory built {type(adapter).__name__}, not an Adapter")  # pyright: ignore[reportUnnecessaryIsInstance]
    return listed


def _name(adapter: object) -> str:
    return type(adapter).__name__


def _first_line(error: BaseException) -> str:
    return next(iter(str(error).strip().splitlines()), type(error).__name__)


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


__all__ = ["AdapterCheckReport", "AdapterFactory", "Run", "check_adapter", "relative_error"]
