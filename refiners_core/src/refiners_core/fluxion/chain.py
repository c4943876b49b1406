"""`Chain` and the ways a chain can combine its layers."""

# pyright: reportPrivateUsage=false
# A chain maintains the parent links of its layers, which `Module` keeps private.
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar, get_origin, overload

import torch
from torch import nn

from refiners_core.fluxion.adapters import Adapter
from refiners_core.fluxion.context import ContextProvider, Contexts
from refiners_core.fluxion.module import Module
from refiners_core.fluxion.printing import describe_inputs, render_tree

T = TypeVar("T", bound=Module)
TChain = TypeVar("TChain", bound="Chain")
WalkPredicate = Callable[[Module, "Chain"], bool]


class Chain(Module):
    """A sequence of layers, each fed with the output of the previous one.

    A tuple output is unpacked into the next layer's arguments. Layers are named after their class
    (`Linear`, or `Linear_1`, `Linear_2`... when several share a class), which gives every layer a stable,
    readable path such as `ViT.Chain_2.Residual_1.Attention.Distribute.Linear_1`. An injected adapter
    takes the name of the layer it wraps, so injecting one never renames its siblings.
    """

    _provider: ContextProvider

    def __init__(self, *layers: Module | Iterable[Module]) -> None:
        super().__init__()
        self._provider = ContextProvider(self.init_context())
        self._set_layers(_flatten(layers))

    def init_context(self) -> Contexts:
        """Default contexts of this chain, merged into the model it becomes part of. Override to declare some."""
        return {}

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse a layer set as an attribute (`chain.foo = fl.Linear(1, 5)`), which torch would make an extra,
        unnamed step of `forward`; raises ValueError saying how to add it."""
        if isinstance(value, nn.Module):
            where = self.get_path() if "_parents" in self.__dict__ else type(self).__name__
            raise ValueError(
                f"cannot set {type(value).__name__} as attribute '{name}' of {type(self).__name__} `{where}`: "
                "a Chain's layers are the steps of its forward, named after their class; add one with "
                "`chain.append(layer)` or `chain.insert(index, layer)` (swap one with `chain.replace(old, new)`), "
                f"or keep a plain reference by wrapping it in a list (`self.{name} = [layer]`)"
            )
        super().__setattr__(name, value)

    def forward(self, *args: Any) -> Any:
        result: Any = args[0] if len(args) == 1 else args
        layer: Any = None
        try:
            for layer in self._modules.values():
                # Testing for a tensor first keeps the common case on isinstance's exact-type fast path: a
                # miss such as `isinstance(tensor, tuple)` costs about 4x more, once per layer.
                if isinstance(result, torch.Tensor) or not isinstance(result, tuple):
                    result = layer(result)
                else:
                    result = layer(*result)
        except Exception as error:
            self._annotate(error, layer, result)
            raise
        return result

    def _call_each(self, args: tuple[Any, ...]) -> list[Any]:
        """Call every layer with the same inputs (for combinators), annotating a failure like `forward`."""
        outputs: list[Any] = []
        layer: Any = None
        try:
            for layer in self._modules.values():
                outputs.append(layer(*args))
        except Exception as error:
            self._annotate(error, layer, args)
            raise
        return outputs

    # Contexts

    @property
    def provider(self) -> ContextProvider:
        """This chain's own context provider (only the root's is in use while the chain is part of a model)."""
        return self._provider

    def set_context(self, context: str, value: dict[str, Any]) -> None:
        """Store the entries of `value` under the named context of the model, for layers that use it.

        Entries already in the context and not in `value` are kept.
        """
        self._context_provider().set(context, value)

    # Reading the tree

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._modules)

    @overload
    def __getitem__(self, key: int) -> Module: ...

    @overload
    def __getitem__(self, key: str) -> Module: ...

    @overload
    def __getitem__(self: TChain, key: slice) -> TChain: ...

    def __getitem__(self, key: int | str | slice) -> Module:
        """A child by position, a layer by name or dotted path (`chain["Residual_1.Attention"]`), or, for a slice,
        a new chain of the same class holding structural copies of those children (weights shared).

        Raises IndexError or KeyError naming this chain and what it holds.
        """
        if isinstance(key, slice):
            return self._structural_copy({}, layers=list(self)[key])
        if isinstance(key, int):
            return self._child_at(key)
        if not isinstance(key, str):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise TypeError(f"a Chain is indexed by position, layer path or slice, not {type(key).__name__}")
        node: Module = self
        for name in key.split("."):
            children: dict[str, Module] = node._modules if isinstance(node, Chain) else {}  # type: ignore[assignment]
            if name not in children:
                where = node.get_path()
                known = ", ".join(children) or "no layers"
                raise KeyError(f"`{where}` has no layer named '{name}' (it has: {known})")
            node = children[name]
        return node

    @overload
    def layer(self, path: str | int | Sequence[str | int]) -> Module: ...

    @overload
    def layer(self, path: str | int | Sequence[str | int], layer_type: type[T]) -> T: ...

    def layer(self, path: str | int | Sequence[str | int], layer_type: type[Module] = Module) -> Module:
        """The layer at `path`, checked to be a `layer_type`.

        `path` is a name or dotted path (`"Chain.Linear_2"`), a position, or a sequence of names and positions
        (`("Chain", 1)`), each step read from the chain reached so far; the empty sequence is this chain.
        Raises KeyError or IndexError naming the chain where a step is missing, and TypeError naming the path and
        the class found when it is not a `layer_type`.
        """
        steps: Sequence[str | int] = (path,) if isinstance(path, (str, int)) else path
        node: Module = self
        names: list[str] = [self.get_path()]
        for step in steps:
            if not isinstance(node, Chain):
                raise KeyError(f"`{'.'.join(names)}` is a {type(node).__name__}, not a Chain: it has no layer {step!r}")
            child = node[step]
            names.append(step if isinstance(step, str) else node.name_of(child))
            node = child
        if not isinstance(node, layer_type):
            raise TypeError(f"layer `{'.'.join(names)}` is a {type(node).__name__}, not a {layer_type.__name__}")
        return node

    def name_of(self, layer: Module) -> str:
        """The name under which `layer` is a child of this chain."""
        for name, child in self._modules.items():
            if child is layer:
                return name
        raise ValueError(f"{type(layer).__name__} is not a child of `{self.get_path()}`")

    @overload
    def walk(self, predicate: type[T], recurse: bool = False) -> Iterator[tuple[T, Chain]]: ...

    @overload
    def walk(self, predicate: WalkPredicate | None = None, recurse: bool = False) -> Iterator[tuple[Module, Chain]]: ...

    def walk(
        self, predicate: type[T] | WalkPredicate | None = None, recurse: bool = False
    ) -> Iterator[tuple[Module, Chain]]:
        """Yield `(layer, parent)` for every layer that matches, depth first.

        `predicate` is a layer type or a function of `(layer, parent)`. The children of a matching layer are
        not visited unless `recurse` is true. As in Refiners, a predicate that raises `StopIteration` prunes the
        walk there: that layer and everything inside it are skipped, and the walk goes on with the next sibling.
        Each chain's children are read before its first match is yielded, so the caller may replace the yielded
        layer (e.g. inject an adapter) while walking. Raises TypeError for a subscripted generic such as
        `Adapter[Linear]`, which `isinstance` cannot check.
        """
        if get_origin(predicate) is not None:
            raise TypeError(f"walk cannot match the subscripted generic {predicate}: pass its class, or a function")
        if predicate is None:
            match: WalkPredicate = lambda layer, parent: True  # noqa: E731
        elif isinstance(predicate, type):
            layer_type = predicate
            match = lambda layer, parent: isinstance(layer, layer_type)  # noqa: E731
        else:
            match = predicate
        yield from self._walk(match, recurse)

    def _walk(self, match: WalkPredicate, recurse: bool) -> Iterator[tuple[Module, Chain]]:
        for layer in list(self):
            try:
                matched = match(layer, self)
            except StopIteration:
                continue
            if matched:
                yield layer, self
                if not recurse:
                    continue
            if isinstance(layer, Chain):
                yield from layer._walk(match, recurse)

    def layers(self, layer_type: type[T], recurse: bool = False) -> Iterator[T]:
        """Yield every layer of the given type, depth first; layers nested in a matching one only if `recurse`."""
        for layer, _ in self.walk(layer_type, recurse=recurse):
            yield layer

    def find(self, layer_type: type[T]) -> T | None:
        """The first layer of the given type, depth first, or None."""
        return next(self.layers(layer_type), None)

    def ensure_find(self, layer_type: type[T]) -> T:
        """The first layer of the given type, depth first; raises `LookupError` naming the type if none."""
        layer = self.find(layer_type)
        if layer is None:
            raise LookupError(f"no {layer_type.__name__} layer in `{self.get_path()}`")
        return layer

    def find_parent(self, layer: Module) -> Chain | None:
        """The chain of this tree that holds `layer` (this chain first, then depth first), or None."""
        if any(child is layer for child in self):
            return self
        return next((parent for _, parent in self.walk(lambda child, _: child is layer)), None)

    def ensure_find_parent(self, layer: Module) -> Chain:
        """The chain of this tree that holds `layer`; raises `LookupError` naming the layer and this chain if none."""
        parent = self.find_parent(layer)
        if parent is None:
            raise LookupError(f"{type(layer).__name__} is not a layer of `{self.get_path()}`")
        return parent

    # Editing the tree

    def insert(self, index: int, layer: Module) -> None:
        """Insert `layer` before position `index` (negative indices count from the end)."""
        layers = list(self)
        if index < 0:
            index = max(0, len(layers) + index + 1)
        layers.insert(index, layer)
        self._set_layers(layers)

    def append(self, layer: Module) -> None:
        """Add `layer` at the end of the chain."""
        self._set_layers([*self, layer])

    def insert_before_type(self, layer_type: type[Module], layer: Module) -> None:
        """Insert `layer` before the first child of the given type."""
        self.insert(self._index_of_type(layer_type), layer)

    def insert_after_type(self, layer_type: type[Module], layer: Module) -> None:
        """Insert `layer` after the first child of the given type."""
        self.insert(self._index_of_type(layer_type) + 1, layer)

    def pop(self, index: int = -1) -> Module:
        """Remove and return the child at `index`."""
        layer = self._child_at(index)
        layers = list(self)
        del layers[index]
        self._set_layers(layers)
        return layer

    def remove(self, layer: Module) -> None:
        """Remove `layer`, which must be a child of this chain."""
        self.pop(self._index_of(layer))

    def replace(self, old_layer: Module, new_layer: Module) -> None:
        """Put `new_layer` in the place of `old_layer`, which must be a child of this chain."""
        layers = list(self)
        layers[self._index_of(old_layer)] = new_layer
        self._set_layers(layers)

    def _structural_copy(self: TChain, copies: dict[int, Module], layers: list[Module] | None = None) -> TChain:
        clone = self._shallow_copy()
        copies[id(self)] = clone
        clone._provider = self._provider.copy(fresh=self.init_context())
        clone._modules = {}
        clone._set_layers(layer._structural_copy(copies) for layer in (list(self) if layers is None else layers))
        if isinstance(clone, Adapter):
            clone._remap_copied(copies)  # pyright: ignore[reportUnknownMemberType]
        return clone

    def _child_at(self, index: int) -> Module:
        layers = list(self)
        if not -len(layers) <= index < len(layers):
            raise IndexError(f"`{self.get_path()}` has {len(layers)} layers, no index {index}")
        return layers[index]

    def _index_of(self, layer: Module) -> int:
        for index, child in enumerate(self):
            if child is layer:
                return index
        raise ValueError(f"{type(layer).__name__} is not a child of `{self.get_path()}`")

    def _index_of_type(self, layer_type: type[Module]) -> int:
        for index, child in enumerate(self):
            if isinstance(child, layer_type):
                return index
        raise LookupError(f"`{self.get_path()}` has no child of type {layer_type.__name__}")

    def _set_layers(self, layers: Iterable[Module]) -> None:
        layers = list(layers)
        for layer in layers:
            if not isinstance(layer, Module):  # pyright: ignore[reportUnnecessaryIsInstance]
                raise TypeError(
                    f"{type(self).__name__} only holds refiners_core.fluxion layers, got {type(layer).__name__}; "
                    "wrap plain torch modules in a fl.Module subclass"
                )
        kept = {id(layer) for layer in layers}
        for old in self._modules.values():
            if id(old) not in kept:
                _unlink(old, self)  # type: ignore[arg-type]
        self._modules.clear()
        self._modules.update(zip(_layer_names(layers), layers))
        for layer in layers:
            self._adopt(layer)

    def _adopt(self, layer: Module) -> None:
        if any(parent is self for parent in layer._parents):
            return
        layer._parents.append(self)
        if isinstance(layer, Chain) and layer._provider.contexts:
            self._context_provider().absorb(layer._provider)

    def _annotate(self, error: Exception, layer: Any, inputs: Any) -> None:
        if layer is None or getattr(error, "_refiners_annotated", False):
            return
        error._refiners_annotated = True  # type: ignore[attr-defined]
        error.add_note(f"in {type(layer).__name__} at `{layer.get_path()}`, called with {describe_inputs(inputs)}")

    def __repr__(self) -> str:
        return render_tree(self)


def _unlink(layer: Module, parent: Chain) -> None:
    layer._parents[:] = [p for p in layer._parents if p is not parent]


def _flatten(layers: Iterable[Module | Iterable[Module]]) -> list[Module]:
    flat: list[Module] = []
    for item in layers:
        if isinstance(item, torch.nn.Module):
            flat.append(item)  # type: ignore[arg-type]
        else:
            flat.extend(item)
    return flat


def _base_name(layer: Module) -> str:
    node: Module = layer
    while isinstance(node, Adapter):
        node = node.target  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    return type(node).__name__  # pyright: ignore[reportUnknownArgumentType]


def _layer_names(layers: list[Module]) -> list[str]:
    base_names = [_base_name(layer) for layer in layers]
    totals = {name: base_names.count(name) for name in base_names}
    seen: dict[str, int] = {}
    names: list[str] = []
    for name in base_names:
        if totals[name] == 1:
            names.append(name)
        else:
            seen[name] = seen.get(name, 0) + 1
            names.append(f"{name}_{seen[name]}")
    return names


class Residual(Chain):
    """`x + chain(x)`: a skip connection around the layers (the first input is added when there are several)."""

    def forward(self, *args: Any) -> Any:
        return args[0] + super().forward(*args)


class Parallel(Chain):
    """Feed the same inputs to every layer and return their outputs as a tuple."""

    def forward(self, *args: Any) -> tuple[Any, ...]:
        return tuple(self._call_each(args))


class Distribute(Chain):
    """Feed the i-th input to the i-th layer and return their outputs as a tuple."""

    def forward(self, *args: Any) -> tuple[Any, ...]:
        if len(args) != len(self):
            raise ValueError(f"`{self.get_path()}` has {len(self)} layers but received {len(args)} inputs")
        outputs: list[Any] = []
        layer: Any = None
        try:
            for layer, arg in zip(self._modules.values(), args):
                outputs.append(layer(arg))
        except Exception as error:
            self._annotate(error, layer, args[len(outputs)])
            raise
        return tuple(outputs)


class Passthrough(Chain):
    """Run the layers for their side effects (e.g. `SetContext`) and return the inputs unchanged."""

    def forward(self, *args: Any) -> Any:
        super().forward(*args)
        return args[0] if len(args) == 1 else args


class Sum(Chain):
    """Feed the same inputs to every layer and add their outputs."""

    def forward(self, *args: Any) -> Any:
        outputs = self._call_each(args)
        total = outputs[0]
        for output in outputs[1:]:
            total = total + output
        return total


class Concatenate(Chain):
    """Feed the same inputs to every layer and concatenate their outputs along `dim`."""

    def __init__(self, *layers: Module | Iterable[Module], dim: int = 0) -> None:
        super().__init__(*layers)
        self.dim = dim

    def forward(self, *args: Any) -> torch.Tensor:
        return torch.cat(self._call_each(args), dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Lambda(Module):
    """Wrap a function as a layer: `Lambda(lambda x: x * 2)`."""

    def __init__(self, func: Callable[..., Any]) -> None:
        super().__init__()
        self.func = func

    def forward(self, *args: Any) -> Any:
        return self.func(*args)

    def extra_repr(self) -> str:
        return getattr(self.func, "__qualname__", repr(self.func))
