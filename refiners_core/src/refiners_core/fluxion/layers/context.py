"""Layers that write to and read from the model's contexts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from refiners_core.fluxion.context import ContextError
from refiners_core.fluxion.module import Module


class SetContext(Module):
    """Store the input under `context[key]` (or hand it to `callback(current, input)`) and pass it on."""

    def __init__(self, context: str, key: str, callback: Callable[[Any, Any], Any] | None = None) -> None:
        super().__init__()
        self.context = context
        self.key = key
        self.callback = callback

    def forward(self, *args: Any) -> Any:
        value = args[0] if len(args) == 1 else args
        values = self.use_context(self.context, key=self.key)
        if self.callback is None:
            values[self.key] = value
        else:
            self.callback(values[self.key], value)
        return value

    def extra_repr(self) -> str:
        return f"context={self.context!r}, key={self.key!r}"


class UseContext(Module):
    """Ignore the input and return `context[key]`."""

    def __init__(self, context: str, key: str) -> None:
        super().__init__()
        self.context = context
        self.key = key

    def forward(self, *args: Any) -> Any:
        values = self.use_context(self.context, key=self.key)
        try:
            return values[self.key]
        except KeyError:
            known = ", ".join(sorted(values)) or "none"
            raise ContextError(
                f"UseContext at `{self.get_path()}`: context '{self.context}' has no key '{self.key}' "
                f"(keys: {known}); set it with `model.set_context('{self.context}', {{'{self.key}': ...}})`"
            ) from None

    def extra_repr(self) -> str:
        return f"context={self.context!r}, key={self.key!r}"
