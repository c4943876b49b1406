"""Timing helpers shared by the benchmarks: interleaved comparisons, environment capture, Markdown tables.

A comparison runs "ours" and "reference" in the same process, alternating them round after round, so
that drift on a shared machine (other processes, frequency scaling, cache state) affects both sides alike.
Each round times a batch of calls per side. By default the clock is the CPU time of the process, which does
not count the time other processes hold the CPU: on a busy 2-core machine wall-clock medians can double
while CPU time stays within a percent.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Seconds per call, one sample per round."""

    samples: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


@dataclass(frozen=True)
class Comparison:
    """Timings of ours and of the reference, taken in the same interleaved rounds."""

    ours: Timing
    reference: Timing
    calls_per_round: int

    @property
    def ratio_min(self) -> float:
        """Best time of ours over best time of the reference (above 1: ours is slower)."""
        return self.ours.min / self.reference.min

    @property
    def ratios(self) -> list[float]:
        """Ours / reference for each round, the two samples of a round being taken back to back."""
        return [o / r for o, r in zip(self.ours.samples, self.reference.samples, strict=True)]

    @property
    def ratio_median(self) -> float:
        """Median of the per-round ratios: unlike a ratio of medians, it cancels drift slower than a round."""
        return statistics.median(self.ratios)

    @property
    def ratio_median_ci(self) -> tuple[float, float]:
        """Distribution-free 95% confidence interval of `ratio_median`, from order statistics of the ratios.

        It assumes independent rounds, so it is a guide to the noise of a run, not a guarantee.
        """
        ratios = sorted(self.ratios)
        half_width = 1.96 * math.sqrt(len(ratios)) / 2
        low = max(0, math.floor(len(ratios) / 2 - half_width) - 1)
        high = min(len(ratios) - 1, math.ceil(len(ratios) / 2 + half_width))
        return ratios[low], ratios[high]


def compare(
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    rounds: int,
    warmup_rounds: int = 10,
    round_seconds: float = 0.01,
    clock: Callable[[], float] = time.process_time,
    calls_per_round: int | None = None,
) -> Comparison:
    """Time `ours` and `reference` in `rounds` interleaved rounds, after `warmup_rounds` untimed ones.

    Both sides make the same number of calls per round, chosen so that the slower side takes about
    `round_seconds` (timer resolution and per-round overhead then vanish), unless `calls_per_round` is given:
    pass 1 for calls that take seconds, where choosing would cost five untimed calls per side. The side that
    goes first alternates from round to round. The garbage collector is off while timing, as in `timeit`. The default
    `clock` suits CPU work run by the calling process; GPU work needs `time.perf_counter` and functions that
    synchronize before returning.
    """
    if rounds < 1:
        raise ValueError(f"compare needs at least one round, got rounds={rounds}")
    if calls_per_round is not None and calls_per_round < 1:
        raise ValueError(f"compare needs at least one call per round, got calls_per_round={calls_per_round}")
    calls = calls_per_round or _calls_per_round(ours, reference, round_seconds, clock)
    ours_samples: list[float] = []
    reference_samples: list[float] = []
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for index in range(warmup_rounds + rounds):
            ours_first = index % 2 == 0
            first, second = (ours, reference) if ours_first else (reference, ours)
            first_time = _time_calls(first, calls, clock)
            second_time = _time_calls(second, calls, clock)
            if index < warmup_rounds:
                continue
            ours_samples.append(first_time if ours_first else second_time)
            reference_samples.append(second_time if ours_first else first_time)
    finally:
        if gc_was_enabled:
            gc.enable()
    return Comparison(Timing(tuple(ours_samples)), Timing(tuple(reference_samples)), calls)


def _time_calls(function: Callable[[], Any], calls: int, clock: Callable[[], float]) -> float:
    start = clock()
    for _ in range(calls):
        function()
    return (clock() - start) / calls


def _calls_per_round(
    ours: Callable[[], Any], reference: Callable[[], Any], round_seconds: float, clock: Callable[[], float]
) -> int:
    # The best of five single calls per side: one slow call must not halve the number of calls per round.
    slowest = max(min(_time_calls(function, 1, clock) for _ in range(5)) for function in (ours, reference))
    return max(1, math.ceil(round_seconds / slowest))


def max_abs_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest absolute elementwise difference; raises `ValueError` if the shapes differ."""
    if ours.shape != reference.shape:
        raise ValueError(f"outputs differ in shape: ours {tuple(ours.shape)}, reference {tuple(reference.shape)}")
    return (ours.float() - reference.float()).abs().max().item()


def environment() -> dict[str, str]:
    """What a reader needs to reproduce or discount a measurement: versions, CPU, threads, load."""
    cpus = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return {
        "date (UTC)": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "refiners-core": _version("refiners-core"),
        "platform": platform.platform(),
        "CPU": _cpu_model(),
        "logical CPUs (usable)": f"{cpus} ({usable})",
        "torch threads (intra-op, inter-op)": f"{torch.get_num_threads()}, {torch.get_num_interop_threads()}",
        "load average at start (1, 5, 15 min)": load,
    }


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment_table(env: dict[str, str]) -> str:
    """`env` (as `environment()` returns it, with any additions) as a two-column Markdown table."""
    return markdown_table(["", ""], [[key, value] for key, value in env.items()])


def environment_section(env: dict[str, str]) -> list[str]:
    """The closing `## Environment` section of a report, as lines: its title, `environment_table(env)`, an end line."""
    return ["## Environment", "", environment_table(env), ""]


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` has one letter per column, `l` or `r` (default: all left)."""
    align = align or "l" * len(headers)
    if len(align) != len(headers) or any(len(row) != len(headers) for row in rows):
        raise ValueError(f"every row and `align` must have {len(headers)} columns, like the headers")
    rules = ["---:" if letter == "r" else "---" for letter in align]
    lines = [headers, rules, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


TIMING_HEADERS = (
    "reference min (s)",
    "ours min (s)",
    "ratio min",
    "reference median (s)",
    "ours median (s)",
    "ratio median",
    "95% CI",
)
"""The headers of the columns of `timing_cells`, for times in seconds."""


def timing_cells(comparison: Comparison, scale: float = 1.0, digits: int = 3) -> list[str]:
    """Table cells: reference min, ours min, ratio min, reference median, ours median, ratio median (bold), 95% CI.

    Times are divided by `scale` and written with `digits` decimals.
    """
    c = comparison
    low, high = c.ratio_median_ci
    return [
        f"{c.reference.min / scale:,.{digits}f}",
        f"{c.ours.min / scale:,.{digits}f}",
        f"{c.ratio_min:.3f}x",
        f"{c.reference.median / scale:,.{digits}f}",
        f"{c.ours.median / scale:,.{digits}f}",
        f"**{c.ratio_median:.3f}x**",
        f"{low:.3f}-{high:.3f}",
    ]


RATIO_HEADERS = ("case", "time (median)", "baseline (median)", "ratio median", "range", "target")
"""The headers of the columns of `ratio_cells`."""


def ratio_cells(name: str, comparison: Comparison, target: float | None, digits: int = 2) -> list[str]:
    """Table cells of one ratio between two states: `name`, the median time of each (seconds, `digits` decimals),
    the ratio median, its confidence interval, and `<= target` (empty when `target` is None)."""
    low, high = comparison.ratio_median_ci
    return [
        name,
        f"{comparison.ours.median:.{digits}f} s",
        f"{comparison.reference.median:.{digits}f} s",
        f"{comparison.ratio_median:.3f}x",
        f"{low:.3f}-{high:.3f}",
        f"<= {target:.2f}x" if target else "",
    ]


def ratio_table(
    comparisons: dict[str, Comparison], targets: dict[str, float], digits: int = 2, align: str | None = None
) -> str:
    """The Markdown table of `ratio_cells` of each comparison, under `RATIO_HEADERS`, with its target if any."""
    rows = [ratio_cells(name, comparison, targets.get(name), digits) for name, comparison in comparisons.items()]
    return markdown_table(RATIO_HEADERS, rows, align)


def relative_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """`max_abs_diff(ours, reference)` over the largest absolute value of `reference`."""
    return max_abs_diff(ours, reference) / reference.abs().max().item()


def bench_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser that prints `description` (a benchmark's docstring) as it is written."""
    return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)


def unet_step_args(
    argv: Sequence[str] | None, description: str, output: Path, rank_of: str | None = None
) -> argparse.Namespace:
    """Parse the options shared by the one-UNet-step adapter benchmarks (LoRA, LyCORIS, IP-Adapter, T2I-Adapter), and
    `--rank` (default 16) when `rank_of` names what it is the rank of; then set torch's intra-op threads to `--threads`
    before anything else runs."""
    parser = bench_parser(description)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default: 7)")
    parser.add_argument("--latent-size", type=int, default=32, help="latent height and width (default: 32)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--output", type=Path, default=output)
    if rank_of:
        parser.add_argument("--rank", type=int, default=16, help=f"rank of {rank_of} (default: 16)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


@dataclass(frozen=True)
class StepMeasurement:
    """What a one-UNet-step adapter benchmark measured: its comparisons by table row, the relative differences of
    the outputs of the two sides by state, and the parameter count of its (largest) adapter, where it reports one."""

    comparisons: dict[str, Comparison]
    differences: dict[str, float]
    parameters: int = 0


def unet_step_main(
    argv: Sequence[str] | None,
    description: str,
    output: Path,
    measure: Callable[[argparse.Namespace], StepMeasurement],
    report: Callable[[StepMeasurement, argparse.Namespace], str],
    rank_of: str | None = None,
) -> int:
    """The `main` of a one-UNet-step adapter benchmark: parse `unet_step_args`, `measure`, write the `report` to
    `--output`. The exit status is 1 if a relative difference of the outputs is above 1e-4 (the timings would then
    compare different computations), else 0."""
    args = unet_step_args(argv, description, output, rank_of)
    measured = measure(args)
    write_report(report(measured, args), args.output)
    return 0 if all(value <= 1e-4 for value in measured.differences.values()) else 1


def write_report(text: str, output: Path) -> None:
    """Write a benchmark's Markdown report to `output` (creating its folder) and print it."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    print(text)


def progress(message: str) -> None:
    """`message` on stderr, after the time of day."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


StateStep = tuple[str, Callable[[str], None], str, Callable[[], torch.Tensor]]
"""(side, set_state, state, step): `set_state(state)` puts one side's model in a state, `step()` runs it once."""


def state_outputs(steps: Sequence[StateStep]) -> dict[tuple[str, str], torch.Tensor]:
    """The output of each step in its state, by (side, state), untimed (for checking that the sides agree)."""
    progress("checking outputs (untimed)")
    outputs: dict[tuple[str, str], torch.Tensor] = {}
    for side, set_state, state, step in steps:
        set_state(state)
        outputs[side, state] = step()
    return outputs


def time_states(steps: Sequence[StateStep], rounds: int, *, settling_calls: int = 0) -> dict[tuple[str, str], Timing]:
    """The CPU time of one call of each step in its state, by (side, state): every step once a round, interleaved,
    for `rounds` rounds. Setting the state is not timed, nor are the `settling_calls` calls made right after it: the
    one-time work a state change leaves to the next call (the kernel's page faults after a LoRA is fused, a cache
    filled again) is paid once per generation, not at each of its steps."""
    samples: dict[tuple[str, str], list[float]] = {(side, state): [] for side, _, state, _ in steps}
    for index in range(rounds):
        progress(f"round {index + 1}/{rounds}")
        for side, set_state, state, step in steps:
            set_state(state)
            for _ in range(settling_calls):
                step()
            start = time.process_time()
            step()
            samples[side, state].append(time.process_time() - start)
    return {key: Timing(tuple(values)) for key, values in samples.items()}


def state_comparisons(
    timings: dict[tuple[str, str], Timing],
    ours_states: Sequence[str],
    diffusers_states: Sequence[str],
    pairs: Sequence[tuple[str, str]],
) -> dict[str, Comparison]:
    """Each state of each side against that side's "no LoRA" state (`ours, STATE`, `diffusers, STATE`), and for
    each (our state, their state) of `pairs`, ours against theirs (`ours / diffusers, STATE`)."""
    comparisons = {
        f"ours, {state}": Comparison(timings["ours", state], timings["ours", "no LoRA"], 1) for state in ours_states
    } | {
        f"diffusers, {state}": Comparison(timings["diffusers", state], timings["diffusers", "no LoRA"], 1)
        for state in diffusers_states
    }
    for state, theirs in pairs:
        comparisons[f"ours / diffusers, {state}"] = Comparison(timings["ours", state], timings["diffusers", theirs], 1)
    return comparisons


def state_ratios(
    timings: dict[tuple[str, str], Timing], rows: dict[str, tuple[tuple[str, str], tuple[str, str]]]
) -> dict[str, Comparison]:
    """A comparison by table row: `rows` maps a row's name to the (side, state) timed and the (side, state) of its
    baseline."""
    return {name: Comparison(timings[timed], timings[baseline], 1) for name, (timed, baseline) in rows.items()}


def state_table(
    comparisons: dict[str, Comparison], targets: dict[str, float], differences: dict[str, float], difference: str
) -> str:
    """The Markdown table of `state_comparisons`: `ratio_cells` of each, then a column headed `difference` that holds
    `differences[STATE]` on the rows `ours, STATE`."""
    rows: list[list[str]] = []
    for name, comparison in comparisons.items():
        state = name.split(", ", 1)[1]
        shown = name.startswith("ours, ") and state in differences
        rows.append([*ratio_cells(name, comparison, targets.get(name)), f"{differences[state]:.1e}" if shown else ""])
    return markdown_table([*RATIO_HEADERS, difference], rows, "lrrrrrr")
