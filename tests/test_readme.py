"""The README's examples run as written, and its install commands name what the packages need."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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


def test_readme_install_from_dist_names_every_third_party_runtime_dependency() -> None:
    """`pip install --no-index` from dist/ needs the rest first: the README's list must be exactly that rest."""
    line = re.search(r"^pip install -c constraints\.txt (.+)$", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert line, "README lost its install-from-dist commands"
    listed = {canonicalize_name(name) for name in line.group(1).split()}
    needed: set[str] = set()
    for package in ("refiners_core", "refiners_lora", "refiners_sd15"):
        project = tomllib.loads((README.parent / package / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        needed |= {canonicalize_name(Requirement(item).name) for item in project["dependencies"]}
    assert listed == {name for name in needed if not name.startswith("refiners-")}
