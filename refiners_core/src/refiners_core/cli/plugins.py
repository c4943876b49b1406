"""`refiners plugins`: what is installed, what each plugin registers, what failed and why."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from refiners_core.plugins import PluginRecord, registry
from refiners_core.plugins.kinds import KINDS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print a JSON list with one object per entry point")


def run(args: argparse.Namespace) -> int:
    """Print the table (or the JSON list), then the registry's other warnings (on stderr with `--json`)."""
    loaded = registry()
    records = loaded.plugins
    if args.json:
        print(json.dumps([record.to_json() for record in records], indent=2))
        for warning in loaded.warnings:
            print(f"refiners plugins: warning: {warning}", file=sys.stderr)
        return 0
    if not records:
        print("No refiners plugins are installed (entry point group `refiners`).")
    else:
        print(format_table(records))
    for warning in loaded.warnings:
        print(f"warning: {warning}")
    return 0


def format_table(records: Sequence[PluginRecord]) -> str:
    """One line per entry point: distribution, version, entry point, what it registers, status."""
    rows = [("DISTRIBUTION", "VERSION", "ENTRY POINT", "REGISTERS", "STATUS")]
    for record in records:
        registers = "; ".join(
            f"{kind.label}: {', '.join(names)}" for kind in KINDS if (names := record.names(kind.key))
        )
        status = record.error if record.status == "incompatible" and record.error else record.status
        if record.status == "error":
            status = f"error: {record.error}"
        rows.append((record.distribution, record.version, record.entry_point, registers or "-", status))
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]) for row in rows
    )
