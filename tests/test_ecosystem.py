"""With every package installed together: each one is discovered through the `refiners` entry point group."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import refiners_core.fluxion as fl
from refiners_core.plugins import registry

OUR_DISTRIBUTIONS = {"refiners-lora", "refiners-sd15", "refiners-sam"}


def _refiners(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "import sys; from refiners_core.cli import main; sys.exit(main())", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_every_package_registers_through_the_entry_point_group() -> None:
    records = {record.distribution: record for record in registry(reload=True).plugins}
    assert OUR_DISTRIBUTIONS <= set(records)
    for distribution in OUR_DISTRIBUTIONS:
        assert records[distribution].error is None, records[distribution].error


def test_refiners_plugins_json_lists_our_packages_without_errors() -> None:
    result = _refiners("plugins", "--json")
    assert result.returncode == 0, result.stderr
    entries = {entry["distribution"]: entry for entry in json.loads(result.stdout)}
    assert OUR_DISTRIBUTIONS <= set(entries)
    assert "lora" in entries["refiners-lora"]["adapters"]
    assert all(entries[name]["error"] is None for name in OUR_DISTRIBUTIONS)


def test_lora_from_the_registry_adapts_a_model_and_ejects_exactly() -> None:
    model = fl.Chain(fl.Linear(8, 16), fl.SiLU(), fl.Linear(16, 4))
    x = torch.randn(3, 8)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    expected = model(x)

    lora = registry().adapters["lora"]
    adapter = lora.create(target=model.ensure_find(fl.Linear), rank=2).inject()
    torch.nn.init.normal_(adapter.lora.up.weight)  # type: ignore[attr-defined]
    assert not torch.equal(model(x), expected)

    adapter.eject()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[key], before[key]) for key in before)
    assert torch.equal(model(x), expected)


def test_demo_runs_offline_and_reports_every_check_ok(tmp_path: Path) -> None:
    result = _refiners("demo", "--quiet", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    assert result.stdout.count("[ok]") == 9  # 5 for the ViT, 4 for SD1.5 (generation with a LoRA)
    assert "at a small size with random weights" in result.stdout
    assert (tmp_path / "refiners-demo-sd15.png").is_file()
