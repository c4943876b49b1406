"""The Adapter protocol: patch a model by putting a layer in the place of another, and take it out again.

An adapter is usually also a `Chain` that contains its target::

    class Scaled(fl.Chain, Adapter[fl.Linear]):
        def __init__(self, target: fl.Linear, factor: float) -> None:
            with self.setup_adapter(target):
                super().__init__(target, fl.Lambda(lambda x: x * factor))

    adapter = Scaled(model.ensure_find(fl.Linear), 2.0).inject()  # the Linear's parent now holds `adapter`
    adapter.eject()  # the parent holds the original Linear again: same object, same state_dict

While an adapter is injected it takes its target's name in the parent, so the paths of the other layers do
not change, and its own weights appear under that name in the model's `state_dict`.
"""

# pyright: reportPrivateUsage=false
# Adapters maintain the parent links of the layers they move, which `Module` keeps private.
from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from refiners_core.fluxion.module import Module, ParentLinks

if TYPE_CHECKING:
    from refiners_core.fluxion.chain import Chain

T = TypeVar("T", bound=Module)
TAdapter = TypeVar("TAdapter", bound="Adapter[Any]")


class AdapterError(RuntimeError):
    """An adapter was injected or ejected at the wrong time or place."""


class Adapter(Generic[T]):
    """Mixin for layers that replace a target layer of a model (see the module docstring)."""

    _adapter_target: list[T]
    _injected_into: ParentLinks

    @property
    def target(self) -> T:
        """The layer this adapter wraps."""
        return self._adapter_target[0]

    @property
    def is_injected(self) -> bool:
        """Whether the adapter currently stands in the place of its target."""
        return bool(self._injected_into)

    @contextlib.contextmanager
    def setup_adapter(self, target: T) -> Generator[None, None, None]:
        """Wrap the construction of the adapter: `with self.setup_adapter(target): super().__init__(target, ...)`.

        Building the adapter must not move the target out of the model: the target keeps its parents until
        `inject` is called.
        """
        if not isinstance(target, Module):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"{type(self).__name__} needs a refiners_core.fluxion layer to adapt, got {target!r}")
        parents = ParentLinks(target._parents)
        try:
            yield
        finally:
            target._parents[:] = parents
        self._adapter_target = [target]
        self._injected_into = ParentLinks()

    def inject(self: TAdapter, parent: Chain | None = None) -> TAdapter:
        """Put this adapter in the place of its target inside `parent` (the target's parent if not given)."""
        target = self.target
        if self.is_injected:
            raise AdapterError(f"{self._describe()} is already injected at `{self._as_module().get_path()}`")
        parent = parent or self._target_parent()
        if not any(child is target for child in parent):
            raise AdapterError(
                f"cannot inject {self._describe()} into `{parent.get_path()}`: "
                f"its target `{target.get_path()}` ({type(target).__name__}) is not a child of it"
            )
        parent.replace(target, self._as_module())
        target._parents.append(self._as_module())  # type: ignore[arg-type]
        self._injected_into = ParentLinks([parent])
        return self

    def _target_parent(self) -> Chain:
        target = self.target
        parents = target.parents
        if len(parents) != 1:
            where = "has no parent" if not parents else f"belongs to {len(parents)} chains"
            raise AdapterError(
                f"cannot inject {self._describe()}: its target `{target.get_path()}` {where}; "
                "pass the parent explicitly with inject(parent)"
            )
        return parents[0]

    def eject(self) -> None:
        """Take the adapter out and put its target back where it was (same object, same weights)."""
        if not self.is_injected:
            raise AdapterError(f"cannot eject {self._describe()}: it is not injected")
        parent = self._injected_into[0]
        me = self._as_module()
        if not any(child is me for child in parent):
            raise AdapterError(
                f"cannot eject {self._describe()}: it is no longer a child of `{parent.get_path()}` "
                "(was the model edited after inject?)"
            )
        target = self.target
        inner: Module = next(child for child in me.children() if child is target or _adapts(child, target))  # type: ignore[assignment]
        if inner is target:
            target._parents[:] = [p for p in target._parents if p is not me]
            parent.replace(me, target)
        else:
            # Another adapter was injected on the same target after this one: it takes this one's place.
            parent.replace(me, inner)
            inner._injected_into = ParentLinks([parent])  # type: ignore[attr-defined]
            me.replace(inner, target)  # type: ignore[attr-defined]
            target._parents[:] = [p for p in target._parents if p is not me]
        self._injected_into = ParentLinks()

    def _as_module(self) -> Module:
        if not isinstance(self, Module):
            raise TypeError(f"{type(self).__name__} must also be a refiners_core.fluxion layer (e.g. a Chain)")
        return self

    def _describe(self) -> str:
        target = self.target
        return f"{type(self).__name__} (target {type(target).__name__} at `{target.get_path()}`)"


def _adapts(layer: object, target: Module) -> bool:
    return isinstance(layer, Adapter) and layer.target is target  # type: ignore[union-attr]
