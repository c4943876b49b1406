"""How a plugin package's tests find its own records: in the plugin registry and in `refiners plugins --json`."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from refiners_core.plugins import PluginRecord, registry


def discovered_plugin(distribution: str, entry_point: str) -> PluginRecord:
    """The record of the installed distribution `distribution` in a freshly reloaded plugin registry, after asserting
    that it has exactly one entry point, `entry_point` (as its metadata writes it: `"name = module"`), loaded without
    error."""
    records = [record for record in registry(reload=True).plugins if record.distribution == distribution]
    assert len(records) == 1, records
    assert records[0].entry_point == entry_point
    assert records[0].error is None and records[0].status == "ok"
    return records[0]


def listed_plugin(distribution: str) -> dict[str, Any]:
    """The record of the distribution `distribution` in the output of `refiners plugins --json`, after asserting that
    the command succeeds and lists it once."""
    from refiners_core.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plugins", "--json"]) == 0
    records = [record for record in json.loads(out.getvalue()) if record["distribution"] == distribution]
    assert len(records) == 1, records
    return records[0]
