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
    _target_holders: ParentLinks
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
        `inject` is called. The chains of the adapter that take the target in (the adapter itself, or a
        chain nested in it) are remembered and become the target's parents while the adapter is injected.
        """
        if not isinstance(target, Module):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"{type(self).__name__} needs a refiners_core.fluxion layer to adapt, got {target!r}")
        parents = ParentLinks(target._parents)
        try:
            yield
        finally:
            holders = ParentLinks(p for p in target._parents if not any(p is q for q in parents))
            target._parents[:] = parents
        self._adapter_target = [target]
        self._target_holders = holders
        self._injected_into = ParentLinks()

    def inject(self: TAdapter, parent: Chain | None = None) -> TAdapter:
        """Put this adapter in the place of its target inside `parent` (the target's parent if not given).

        Raises AdapterError, naming the adapter and the layer path, if the adapter is already injected or
        `parent` does not hold the target.
        """
        target = self.target
        me = self._as_module()
        if self.is_injected:
            raise AdapterError(f"{self._describe()} is already injected at `{me.get_path()}`")
        parent = parent or self._target_parent()
        if not any(child is target for child in parent):
            raise AdapterError(
                f"cannot inject {self._describe()} into `{parent.get_path()}`: "
                f"its target `{target.get_path()}` ({type(target).__name__}) is not a child of it"
            )
        slot = _index(target._parents, parent)
        parent.replace(target, me)
        target._parents[slot:slot] = self._target_holders
        self._injected_into = ParentLinks([parent])
        return self

    def eject(self) -> None:
        """Take the adapter out and put its target back where it was (same object, same weights).

        Raises AdapterError if the adapter is not injected, or the model was edited so that it no longer is
        where `inject` put it.
        """
        if not self.is_injected:
            raise AdapterError(f"cannot eject {self._describe()}: it is not injected")
        parent = self._injected_into[0]
        me = self._as_module()
        target = self.target
        occupant, holder = self._occupant()
        if not any(child is me for child in parent) or occupant is None or holder is None:
            raise AdapterError(
                f"cannot eject {self._describe()}: it is no longer a child of `{parent.get_path()}`, where it was "
                "injected (was the model edited after inject?)"
            )
        if occupant is target:
            slot = min(_index(target._parents, holder) for holder in self._target_holders)
            target._parents[:] = [p for p in target._parents if not _contains(self._target_holders, p)]
            parent.replace(me, target)
            target._parents.insert(slot, target._parents.pop(_index(target._parents, parent)))
        else:
            # Another adapter was injected on the same target after this one: it takes this one's place,
            # and this adapter gets its target back so that it can be injected again.
            parent.replace(me, occupant)
            occupant._injected_into = ParentLinks([parent])  # type: ignore[attr-defined]
            holder.replace(occupant, target)
            target._parents[:] = [p for p in target._parents if p is not holder]
        self._injected_into = ParentLinks()

    def check_in_place_injection(self, parent: Chain | None, target_kind: str) -> None:
        """For an adapter that patches its target in place (rather than take its place): refuse a `parent` other
        than the target and a second injection.

        Raises AdapterError naming the adapter, `target_kind` (such as "UNet") and the layer paths.
        """
        target = self.target
        name = type(self).__name__
        if parent is not None and parent is not target:
            raise AdapterError(
                f"{name} patches the {target_kind} at `{target.get_path()}` in place: it cannot be injected into "
                f"`{parent.get_path()}`"
            )
        if self.is_injected:
            raise AdapterError(f"this {name} is already injected into `{target.get_path()}`")

    def _remap_copied(self, copies: dict[int, Module]) -> None:
        """After a structural copy, point at the copies of the target, its holders and the parent."""
        self._adapter_target = [copies.get(id(self.target), self.target)]  # type: ignore[list-item]
        self._target_holders = ParentLinks(copies.get(id(h), h) for h in self._target_holders)  # type: ignore[misc]
        self._injected_into = ParentLinks(copies.get(id(p), p) for p in self._injected_into)  # type: ignore[misc]

    def _occupant(self) -> tuple[Module | None, Chain | None]:
        """What sits in the target's place inside this adapter (the target, or an adapter stacked on it)."""
        target = self.target
        for holder in self._target_holders:
            for child in holder:
                if child is target or _adapts(child, target):
                    return child, holder
        return None, None

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

    def _as_module(self) -> Module:
        if not isinstance(self, Module):
            raise TypeError(f"{type(self).__name__} must also be a refiners_core.fluxion layer (e.g. a Chain)")
        return self

    def _describe(self) -> str:
        target = self.target
        return f"{type(self).__name__} (target {type(target).__name__} at `{target.get_path()}`)"


def _adapts(layer: object, target: Module) -> bool:
    return isinstance(layer, Adapter) and layer.target is target  # type: ignore[union-attr]


def _contains(links: list[Chain], chain: Chain) -> bool:
    return any(link is chain for link in links)


def _index(links: list[Chain], chain: Chain) -> int:
    return next(index for index, link in enumerate(links) if link is chain)
