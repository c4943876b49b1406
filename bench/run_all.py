"""Run the whole CPU benchmark suite and write one Markdown report, `bench/results/suite/summary.md`.

    python bench/run_all.py [--only NAME,...] [--quick] [--results DIR]

Each benchmark runs as its own process, one after the other, with the settings of `SUITE` (chosen so that the suite
takes under 20 minutes on a quiet 2-core CPU without SDXL, about 6 more with SDXL; each script's own defaults,
described in `bench/README.md`, take longer and are the ones the targets are judged at), and writes its report into
the results folder. The summary gathers the environment, the time each benchmark took, every ratio (ours /
reference, and ours / ours for the LoRA states) with its target, every accuracy figure (max abs difference of the
outputs), then each report in full. A benchmark that fails is reported as such and the others still run; the exit
status is then 1.

`--quick` runs each benchmark at its smallest setting (a few seconds to a minute each) to check that the suite
works, writing into a temporary folder unless `--results` is given: its numbers are not meant to be read.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from timing import bench_parser, environment, environment_section, markdown_table

BENCH = Path(__file__).resolve().parent
RELEASES = ("refiners-core", "refiners-lora", "refiners-sd15", "refiners-sam", "refiners-sdxl")
REFERENCES = ("diffusers", "transformers", "accelerate", "peft", "segment-anything", "safetensors")

# name -> (arguments of the suite run, arguments of the quick check)
SUITE: dict[str, tuple[list[str], list[str]]] = {
    "chain_overhead": (["--rounds", "150"], ["--rounds", "3"]),
    "cli_startup": (["--rounds", "15"], ["--rounds", "2"]),
    "sd15_load": (["--repeats", "3"], ["--repeats", "1"]),
    "sd15_components": (["--latent-size", "32", "--rounds", "4"], ["--latent-size", "8", "--rounds", "1"]),
    "sd15_generate": (
        ["--size", "256", "--steps", "3", "--rounds", "2"],
        ["--size", "64", "--steps", "1", "--rounds", "1"],
    ),
    "generate_many": (
        ["--size", "128", "--steps", "2", "--images", "4"],
        ["--size", "64", "--steps", "1", "--images", "4"],
    ),
    "sam": (["--rounds", "2"], ["--rounds", "1"]),
    "lora": (["--rounds", "3"], ["--latent-size", "8", "--rounds", "1"]),
    "lycoris": (["--rounds", "3"], ["--latent-size", "8", "--rounds", "1"]),
    "sdxl": (
        ["--latent-size", "32", "--rounds", "2", "--repeats", "1"],
        ["--latent-size", "8", "--rounds", "1", "--repeats", "1"],
    ),
    "t2i_adapter": (["--rounds", "3"], ["--latent-size", "8", "--rounds", "1"]),
    "lora_sdxl": (["--rounds", "2"], ["--latent-size", "8", "--rounds", "1"]),
}


@dataclass(frozen=True)
class Run:
    name: str
    command: list[str]
    seconds: float
    returncode: int
    report: str  # the benchmark's Markdown report, empty if it wrote none
    stderr_tail: str


def log(message: str) -> None:
    print(f"[run_all {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(name: str, arguments: list[str], results: Path) -> Run:
    output = results / f"{name}.md"
    output.unlink(missing_ok=True)
    command = [sys.executable, str(BENCH / f"{name}.py"), *arguments, "--output", str(output)]
    log(f"{name}: {' '.join(command[1:])}")
    start = time.monotonic()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.monotonic() - start
    log(f"{name}: exit status {result.returncode} after {seconds:.0f} s")
    report = output.read_text(encoding="utf-8") if output.exists() else ""
    return Run(name, command, seconds, result.returncode, report, result.stderr[-2000:])


def sections(report: str) -> dict[str, str]:
    """The report's `## ` sections by title ("" for what comes before the first one, title line included)."""
    found: dict[str, str] = {}
    title = ""
    for block in re.split(r"^(?=## )", report, flags=re.MULTILINE):
        if block.startswith("## "):
            title, _, block = block.partition("\n")
            title = title[3:].strip()
        found[title] = block.strip()
    return found


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table of `text`, as rows of cells (header first, the `---` rule left out)."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not all(re.fullmatch(r":?-+:?", cell) for cell in cells):
                current.append(cells)
        elif current:
            found.append(current)
            current = []
    return found


def ratio_rows(run: Run) -> list[list[str]]:
    """benchmark, measurement, ratio median (or ours / reference), target: from every table that has them."""
    rows: list[list[str]] = []
    for section, text in sections(run.report).items():
        for table in tables(text):
            header, body = table[0], table[1:]
            column = next((i for i, cell in enumerate(header) if cell in ("ratio median", "ours / reference")), None)
            if column is None:
                continue
            target = header.index("target") if "target" in header else None
            for cells in body:
                if cells[column]:
                    label = _label(header, cells, column, section)
                    rows.append([run.name, label, cells[column], cells[target] if target is not None else ""])
    return rows


def _label(header: list[str], cells: list[str], column: int, section: str) -> str:
    """What a row measures: its first cell (with the side, in per-side tables), prefixed by a memory section."""
    if header[0] == "rounds":  # a one-row table: the section says what it is
        return section.lower()
    label = f"{cells[0]}, {cells[1]}" if len(header) > 1 and header[1] == "side" else cells[0]
    if header[column] == "ours / reference":
        return f"peak RSS: {label}"
    return label if section.lower() in ("time", "") else f"{section.lower()}: {label}"


def accuracy_lines(run: Run) -> list[str]:
    """The accuracy figures of a report: its tables with a max abs (or relative) difference, or its text."""
    lines: list[str] = []
    for section, text in sections(run.report).items():
        for table in tables(text):
            header = table[0]
            columns = [i for i, cell in enumerate(header) if "diff" in cell]
            if not columns:
                continue
            for cells in table[1:]:
                values = ", ".join(f"{header[i]} {cells[i]}" for i in columns if cells[i])
                if values:
                    lines.append(f"- {run.name}, {cells[0]}: {values}")
        if section == "Accuracy":
            prose = [line for line in text.splitlines() if line and not line.startswith("|")]
            if not tables(text):
                lines.extend(f"- {run.name}: {line}" for line in prose)
    return lines


def versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for distribution in (*RELEASES, *REFERENCES):
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[distribution] = "not installed"
    return found


def summary(runs: Sequence[Run], env: dict[str, str], quick: bool) -> str:
    total = sum(run.seconds for run in runs)
    ran = [
        [
            run.name,
            "ok" if run.returncode == 0 else f"**failed** (exit {run.returncode})",
            f"{run.seconds:.0f}",
            "`" + " ".join(["python", f"bench/{run.name}.py", *run.command[2:-2]]) + "`",
        ]
        for run in runs
    ]
    ratios = [row for run in runs for row in ratio_rows(run)]
    accuracy = [line for run in runs for line in accuracy_lines(run)]
    parts = [
        "# Benchmark suite: ours against the reference libraries, CPU",
        "",
        "Written by `python bench/run_all.py`"
        + (" --quick (smallest settings: do not read the numbers)" if quick else "")
        + f"; {len(runs)} benchmark(s) in {total / 60:.1f} minutes. Ratios are ours / reference (below 1: ours is",
        "faster or smaller), the median of per-round ratios; the LoRA ratios compare states of one side. How each",
        "benchmark measures is in `bench/README.md`; its full report follows the tables below.",
        "",
        *environment_section(env),
        "## Benchmarks run",
        "",
        markdown_table(["benchmark", "status", "seconds", "command"], ran, "llrl"),
        "",
        "## Every ratio",
        "",
        markdown_table(["benchmark", "measurement", "ratio", "target"], ratios, "llrl") if ratios else "(none)",
        "",
        "## Accuracy: difference of the outputs, ours against the reference",
        "",
        *(accuracy or ["(none)"]),
        "",
    ]
    for run in runs:
        parts += [f"## {run.name}", ""]
        if run.returncode:
            parts += ["It failed; the end of its error output:", "", "```", run.stderr_tail.strip(), "```", ""]
        for title, text in sections(run.report).items():
            if title == "Environment":
                continue
            body = re.sub(r"^# .*\n?", "", text).strip() if title == "" else text
            parts += ([f"### {title}", ""] if title else []) + ([body, ""] if body else [])
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(SUITE)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="smallest settings, to check that every benchmark runs")
    parser.add_argument("--results", type=Path, help="folder for the reports (default: bench/results/suite)")
    args = parser.parse_args(argv)
    names = [name.strip() for name in (args.only or ",".join(SUITE)).split(",") if name.strip()]
    unknown = sorted(set(names) - SUITE.keys())
    if unknown or not names:
        parser.error(f"--only takes a comma-separated subset of {', '.join(SUITE)}, got {args.only!r}")
    results: Path = args.results or (
        Path(tempfile.mkdtemp(prefix="bench_quick_")) if args.quick else BENCH / "results" / "suite"
    )
    results.mkdir(parents=True, exist_ok=True)
    env = {**environment(), **versions(), "repository commit": _commit()}
    del env["torch threads (intra-op, inter-op)"]  # this process computes nothing: each benchmark sets its own
    env["torch threads"] = "1 (each benchmark's `--threads` default)"
    runs = [run(name, SUITE[name][1 if args.quick else 0], results) for name in names]
    text = summary(runs, env, args.quick)
    (results / "summary.md").write_text(text, encoding="utf-8")
    log(f"summary written to {results / 'summary.md'}")
    return 1 if any(run.returncode for run in runs) else 0


def _commit() -> str:
    from sd15_components import source_commit

    return source_commit()


if __name__ == "__main__":
    sys.exit(main())
