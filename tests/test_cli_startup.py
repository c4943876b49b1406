"""With every package of this repository installed, `refiners --help`, `refiners plugins`, `refiners plugins --json`
and `refiners lora inspect --help` load every plugin without importing torch (plugins register references, imported
on first use): the CLI answers in a fraction of a second. bench/cli_startup.py measures the time."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "numpy", "PIL", "safetensors", "diffusers", "transformers")
SCRIPT = """
import contextlib, io, json, sys
from refiners_core.cli import main
output = io.StringIO()
with contextlib.redirect_stdout(output):
    try:
        code = main({argv!r})
    except SystemExit as exit:
        code = exit.code
print(json.dumps({{"code": code, "output": output.getvalue(), "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["plugins", "--json"], ["lora", "inspect", "--help"]])
def test_the_cli_lists_every_plugin_without_importing_torch(argv: list[str]) -> None:
    script = SCRIPT.format(argv=argv, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["code"] in (0, None)
    assert report["heavy"] == [], f"`refiners {' '.join(argv)}` imported {report['heavy']}"
    if argv == ["plugins", "--json"]:
        records = json.loads(report["output"])
        assert len(records) >= 10 and all(record["status"] == "ok" for record in records), records
    if argv == ["--help"]:
        assert "generate" in report["output"] and "train" in report["output"] and "lora" in report["output"]
    if argv[0] == "lora":
        assert "--model sd15|sdxl|PATH" in report["output"]
