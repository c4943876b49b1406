"""How long the `refiners` command takes to answer before any model is involved, against `python -c pass`.

    python bench/cli_startup.py [--rounds N] [--output FILE]

Each round runs, in fresh processes and interleaved, `python -c pass` (the interpreter alone, with this
environment's site-packages), `refiners --help`, `refiners plugins` and `refiners plugins --json`, every package of
this repository installed. Wall time per process; the medians and what each command adds to the bare interpreter are
reported. Target: `refiners --help` at most 0.3 s more than `python -c pass`. It also records whether loading the
registry imported torch (it must not: plugins register references, imported on first use).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import bench_parser, environment, environment_table, markdown_table, write_report

BENCH = Path(__file__).resolve().parent
TARGET = 0.3
REFINERS = [sys.executable, "-c", "import sys; from refiners_core.cli import main; sys.exit(main())"]
COMMANDS: dict[str, list[str]] = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "refiners --help": [*REFINERS, "--help"],
    "refiners plugins": [*REFINERS, "plugins"],
    "refiners plugins --json": [*REFINERS, "plugins", "--json"],
}
TORCH_CHECK = (
    "import sys; from refiners_core.plugins import registry; loaded = registry(); "
    "print(len(loaded.plugins), 'torch' in sys.modules)"
)


def _seconds(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default: 15)")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "cli_startup.md")
    args = parser.parse_args()
    env = environment()
    for command in COMMANDS.values():  # warm the page cache and the bytecode caches
        _seconds(command)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(args.rounds):
        for name, command in COMMANDS.items():
            times[name].append(_seconds(command))
    check = subprocess.run([sys.executable, "-c", TORCH_CHECK], check=True, capture_output=True, text=True)
    plugins, torch_imported = check.stdout.split()
    base = statistics.median(times["python -c pass"])
    rows: list[list[str]] = []
    for name, values in times.items():
        median = statistics.median(values)
        added = median - base
        verdict = ""
        if name == "refiners --help":
            verdict = f"<= +{TARGET} s {'met' if added <= TARGET else '**missed**'}"
        rows.append([name, f"{min(values):.3f}", f"{median:.3f}", f"{added:+.3f}", verdict])
    table = markdown_table(["command", "min (s)", "median (s)", "added to python -c pass (s)", "target"], rows, "lrrrl")
    report = "\n\n".join(
        [
            "# `refiners` CLI start-up",
            f"Wall time of fresh processes, {args.rounds} interleaved rounds after one warm-up call each, every "
            f"package of this repository installed ({plugins} plugin entry points).",
            table,
            f"Loading the registry imported torch: **{torch_imported == 'True'}**.",
            "## Environment",
            environment_table(env),
        ]
    )
    write_report(report + "\n", args.output)


if __name__ == "__main__":
    main()
