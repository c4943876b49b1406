"""`torch.compile` helpers for tests: a fresh dynamo cache, and making any recompilation an error."""

from __future__ import annotations

import contextlib
from collections.abc import Generator


@contextlib.contextmanager
def fresh_dynamo() -> Generator[None]:
    """Reset torch.compile's caches before and after the block, so compilations of other tests neither help nor
    hinder it (a cache hit would hide a recompilation, a full cache would hit the recompile limit)."""
    import torch._dynamo

    torch._dynamo.reset()  # pyright: ignore[reportPrivateImportUsage]
    try:
        yield
    finally:
        torch._dynamo.reset()  # pyright: ignore[reportPrivateImportUsage]


@contextlib.contextmanager
def fail_on_recompile() -> Generator[None]:
    """Within the block, a compiled function that would recompile raises instead: a test asserts that a change
    (a LoRA scale, a new adapter within declared limits) is picked up by the graph already compiled."""
    import torch

    with torch.compiler.set_stance("fail_on_recompile"):
        yield
