"""Contexts: named dictionaries that carry data to deeply nested layers of a model.

A model's root chain owns one `ContextProvider`. `chain.set_context("diffusion", {"timestep": t})` stores
values there, and any layer of the model reads them back with `layer.use_context("diffusion")` (the
`UseContext` layer does exactly that), without threading extra arguments through `forward`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from refiners_core.fluxion.module import Module

Context = dict[str, Any]
Contexts = dict[str, Context]


class ContextError(LookupError):
    """A layer asked for a context or a key that was never set."""


class ContextProvider:
    """The contexts of one model: context name -> {key: value}."""

    def __init__(self, contexts: Contexts | None = None) -> None:
        self.contexts: Contexts = {name: dict(values) for name, values in (contexts or {}).items()}

    def set(self, context: str, values: Context) -> None:
        """Update the named context with `values`, creating it if needed."""
        self.contexts.setdefault(context, {}).update(values)

    def get(self, context: str, requester: Module | None = None, key: str | None = None) -> Context:
        """The named context, or a `ContextError` naming it, the key wanted and the layer that asked."""
        try:
            return self.contexts[context]
        except KeyError:
            wanted = f" (for its key '{key}')" if key is not None else ""
            where = f" by {type(requester).__name__} at `{requester.get_path()}`" if requester is not None else ""
            known = ", ".join(sorted(self.contexts)) or "none"
            example = f"'{key}': ..." if key is not None else "..."
            raise ContextError(
                f"context '{context}' was requested{wanted}{where} but never set (set contexts: {known}); "
                f"call `model.set_context('{context}', {{{example}}})` first"
            ) from None

    def copy(self, fresh: Contexts) -> ContextProvider:
        """A copy for a structural copy of the model: `fresh` defaults, plus the other values set here."""
        copied = ContextProvider(fresh)
        for name, values in self.contexts.items():
            mine = copied.contexts.setdefault(name, {})
            for key, value in values.items():
                mine.setdefault(key, value)
        return copied

    def absorb(self, other: ContextProvider) -> None:
        """Take the contexts of a chain that joins this model; values already set here win."""
        for name, values in other.contexts.items():
            mine = self.contexts.setdefault(name, {})
            for key, value in values.items():
                mine.setdefault(key, value)
