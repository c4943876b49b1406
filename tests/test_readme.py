"""The README's Python examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.DOTALL)


def test_readme_fluxion_example_runs() -> None:
    blocks = [block for block in _python_blocks() if "import refiners_core.fluxion as fl" in block]
    assert blocks, "README lost its Fluxion example"
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    model = namespace["model"]
    assert "LoraAdapter" in repr(model)
