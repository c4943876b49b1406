"""The base class of every Fluxion layer: a `torch.nn.Module` that knows its parents."""

from __future__ import annotations

import copy
import enum
import functools
import inspect
from typing import TYPE_CHECKING, Any, ClassVar, Self, TypeVar

import torch
from torch import nn

if TYPE_CHECKING:
    from refiners_core.fluxion.chain import Chain
    from refiners_core.fluxion.context import Context, ContextProvider

TModule = TypeVar("TModule", bound="Module")

Device = torch.device | str | None
"""Where a layer creates its tensors: a `torch.device`, its name, or None for the default device."""


class ParentLinks(list["Chain"]):
    """The chains a layer belongs to, in the order it joined them.

    Stored as a plain attribute (not a submodule) so parents are not registered twice in the module tree.
    A deep copy keeps only the parents that are copied along with the layer, so copying a sub-tree never
    drags the rest of the model with it.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> ParentLinks:
        return ParentLinks(memo[id(parent)] for parent in self if id(parent) in memo)


class Module(nn.Module):
    """A layer of a Fluxion model.

    Besides being a regular `nn.Module`, a layer knows the chains it belongs to, which gives it a readable
    path in the model (`get_path`) and access to the contexts of the model it is part of (`use_context`).
    """

    _parents: ParentLinks
    _init_args: tuple[tuple[Any, ...], dict[str, Any]]

    pure: ClassVar[bool] = False
    """Declared `True` by a layer class whose output is a function of its input and of its own parameters and
    buffers (and its children's) only: no context read, no randomness, no state kept from call to call. Such an
    output may be reused while the input and those tensors are unchanged (`is_pure`). Not inherited: a subclass
    declares it again, since it may read a context or draw random numbers where its base class did not."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # The constructor's arguments are recorded for `short_repr` (numbers, strings and the like only, so that a
        # layer keeps no reference to the tensors or layers it was built from).
        layer = super().__new__(cls)
        hidden = {name for name, value in kwargs.items() if not _is_shown(value)}
        layer.__dict__["_init_args"] = (
            tuple(value if _is_shown(value) else _HIDDEN for value in args),
            {name: _HIDDEN if name in hidden else value for name, value in kwargs.items()},
        )
        return layer

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parents = ParentLinks()

    @property
    def parent(self) -> Chain | None:
        """The chain this layer belongs to (the first one if it is shared by several), or None."""
        return self._parents[0] if self._parents else None

    @property
    def parents(self) -> tuple[Chain, ...]:
        """Every chain this layer belongs to."""
        return tuple(self._parents)

    @property
    def root(self) -> Module:
        """The top of the model this layer belongs to (itself when it has no parent)."""
        node: Module = self
        while node._parents:
            node = node._parents[0]
        return node

    @property
    def device(self) -> torch.device:
        """Device of the first parameter or buffer (CPU for a layer without any)."""
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first floating point parameter or buffer (the default dtype for a layer without any)."""
        for tensor in self.parameters():
            if tensor.is_floating_point():
                return tensor.dtype
        for tensor in self.buffers():
            if tensor.is_floating_point():
                return tensor.dtype
        return torch.get_default_dtype()

    def get_path(self, top: Module | None = None) -> str:
        """Dotted path of this layer, e.g. `ViT.Chain_2.Residual_1.Attention.Distribute.Linear_1`.

        The path starts with the class name of the model's root, or is relative to `top` when given.
        """
        names: list[str] = []
        node: Module = self
        while node is not top and node._parents:
            parent = node._parents[0]
            names.append(parent.name_of(node))
            node = parent
        if top is None:
            names.append(type(node).__name__)
        elif node is not top:
            raise ValueError(f"{type(self).__name__} at `{self.get_path()}` is not inside {type(top).__name__}")
        return ".".join(reversed(names))

    def use_context(self, context: str, key: str | None = None) -> Context:
        """The named context of the model this layer belongs to (see `Chain.set_context`).

        `key` only serves the error message when the context was never set.
        """
        return self._context_provider().get(context, requester=self, key=key)

    def _context_provider(self) -> ContextProvider:
        from refiners_core.fluxion.chain import Chain

        root = self.root
        if not isinstance(root, Chain):
            raise LookupError(f"{type(self).__name__} is not inside a Chain: it has no context to read")
        return root.provider

    def structural_copy(self: TModule) -> TModule:
        """A copy of the layer's structure that shares its weights.

        Layers holding parameters or buffers are shared; other layers are copied. Adapters injected into
        the copy do not affect the original.
        """
        return self._structural_copy({})

    def _structural_copy(self: TModule, copies: dict[int, Module]) -> TModule:
        if _holds_tensors(self):
            return self
        clone = self._shallow_copy()
        copies[id(self)] = clone
        return clone

    def _shallow_copy(self: TModule) -> TModule:
        clone = copy.copy(self)
        for store in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            if store in clone.__dict__:
                clone.__dict__[store] = copy.copy(clone.__dict__[store])
        clone._parents = ParentLinks()
        return clone

    def short_repr(self) -> str:
        """One line describing this layer: its class and its key sizes (`extra_repr`).

        A layer that does not define `extra_repr` shows the constructor arguments it was given that differ from
        their defaults, when they are numbers, strings, booleans, enums or tuples of those (`Block(dim=320)`);
        `device` and `dtype` are left out, as the model's header line shows them.
        """
        extra = self.extra_repr() or _arguments_repr(type(self), *self.__dict__.get("_init_args", ((), {})))
        return f"{type(self).__name__}({extra})"

    def __repr__(self) -> str:
        return self.short_repr()


_HIDDEN: Any = object()
_NOT_SHOWN = frozenset({"device", "dtype"})


def is_pure(layer: nn.Module) -> bool:
    """Whether `layer` and every layer under it are of classes that declare `Module.pure` themselves (see there)."""
    return all(vars(type(module)).get("pure", False) is True for module in layer.modules())


def _is_shown(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, enum.Enum)):
        return True
    if not isinstance(value, (tuple, list)):
        return False
    items: tuple[object, ...] | list[object] = value  # pyright: ignore[reportUnknownVariableType]
    return all(_is_shown(item) for item in items)


@functools.cache
def _init_signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None


def _arguments_repr(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """`name=value, ...` for the recorded constructor arguments that are shown and differ from their defaults."""
    signature = _init_signature(cls)
    if signature is None or not (args or kwargs):
        return ""
    try:
        bound = signature.bind(None, *args, **kwargs)
    except TypeError:
        return ""
    parts: list[str] = []
    for name, value in list(bound.arguments.items())[1:]:
        parameter = signature.parameters[name]
        given: dict[str, Any] = value if parameter.kind is inspect.Parameter.VAR_KEYWORD else {name: value}
        for key, item in given.items():
            if key in _NOT_SHOWN or not _is_shown(item) or _is_default(item, parameter):
                continue
            parts.append(
                f"{key}={type(item).__name__}.{item.name}" if isinstance(item, enum.Enum) else f"{key}={item!r}"
            )
    return ", ".join(parts)


def _is_default(value: Any, parameter: inspect.Parameter) -> bool:
    if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
        return value == ()
    default = parameter.default
    return default is not inspect.Parameter.empty and type(value) is type(default) and value == default


def _holds_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False)) or any(True for _ in module.buffers(recurse=False))
