"""Loading a Stable Diffusion 1.5 diffusers folder: `StableDiffusion_1.from_pretrained` against diffusers, fp32 on CPU,
ours measured twice: by default (copy-on-load) and with `mmap=True`.

    python bench/sd15_load.py [--repeats N] [--folder DIR] [--threads N] [--output bench/results/sd15_load.md]

The folder holds the published SD1.5 architecture (`unet/`, `vae/`, `text_encoder/`, 4.2 GB) with random weights,
each written by its reference library's `save_pretrained` (the writers of `sd15_components.py`), into a temporary
folder unless `--folder` names an existing one. Ours loads it with `StableDiffusion_1.from_pretrained`, once by
default (the weights copied into the process's memory: a file changed afterwards does not reach the model) and once
with `mmap=True` (the weights are views of the memory-mapped files, which must then stay unchanged); the reference
with diffusers' `UNet2DConditionModel.from_pretrained` and `AutoencoderKL.from_pretrained` and transformers'
`CLIPTextModel.from_pretrained`, the three loads `StableDiffusionPipeline.from_pretrained` makes (it also reads a
tokenizer and a scheduler config, which this folder does not hold).

Every load runs in a fresh process, so that its peak RSS is its own and no allocator or import cache is shared;
the three sides take turns going first from repeat to repeat. A mapped load (diffusers', ours with `mmap=True`)
reads a weight from the file when it is first used, so loading alone does not say when the weights are in memory:
the probe also reads every weight once after loading (`tensor.sum()` over every parameter and buffer) and reports
the time and peak RSS up to that point too. The files are read once before the first repeat, so every load finds
them in the page cache.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
from sd15_components import PROMPT_IDS, VAE_SCALING_FACTOR, save_text_encoder, save_unet, save_vae, versions
from timing import Comparison, Timing, environment, markdown_table, write_report

Side = Literal["ours", "ours-mmap", "reference"]
OURS: tuple[Side, ...] = ("ours", "ours-mmap")
SIDE_TITLES: dict[Side, str] = {"ours": "ours (copy)", "ours-mmap": "ours, mmap=True", "reference": "reference"}
LOAD_HEADERS = ["", "side", "reference min", "ours min", "reference median", "ours median", "ratio median", "95% CI"]
LOAD_HEADERS += ["target"]
Outputs = dict[str, torch.Tensor]
Loader = Callable[[Path], tuple[list[torch.nn.Module], Callable[[], Outputs]]]
START = time.monotonic()
TIMESTEP = 500


class Probe(NamedTuple):
    """One load in a fresh process: seconds and peak RSS (bytes) at each point of its life."""

    load_wall: float  # from_pretrained returned
    load_cpu: float
    read_wall: float  # ... and every weight was read once
    read_cpu: float
    rss_imported: int  # torch and the side's library imported
    rss_loaded: int
    rss_read: int


def log(message: str) -> None:
    print(f"[{time.monotonic() - START:5.0f} s] {message}", file=sys.stderr, flush=True)


def peak_rss() -> int:
    """VmHWM, the peak RSS of this process. Not `ru_maxrss`: Linux carries it over from the parent through fork and
    exec, so a child of a big process would report at least its parent's peak."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def load_ours(folder: Path, *, mmap: bool) -> tuple[list[torch.nn.Module], Callable[[], Outputs]]:
    from refiners_sd15 import StableDiffusion_1

    sd = StableDiffusion_1.from_pretrained(folder, dtype=torch.float32, mmap=mmap)

    def outputs() -> Outputs:
        latents, text, token_ids = inputs()
        sd.unet.set_timestep(torch.tensor([TIMESTEP]))
        sd.unet.set_clip_text_embedding(text)
        return {
            "unet": sd.unet(latents),
            "vae": sd.lda.decode(latents[:1]),
            "clip": sd.clip_text_encoder(token_ids),
        }

    return [sd.unet, sd.lda, sd.clip_text_encoder], outputs


def load_reference(folder: Path) -> tuple[list[torch.nn.Module], Callable[[], Outputs]]:
    from diffusers import AutoencoderKL, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]
    from transformers import CLIPTextModel

    unet: Any = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    vae: Any = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    text_encoder: Any = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32)

    def outputs() -> Outputs:
        latents, text, token_ids = inputs()
        return {
            "unet": unet(latents, TIMESTEP, encoder_hidden_states=text).sample,
            "vae": vae.decode(latents[:1] / VAE_SCALING_FACTOR).sample,
            "clip": text_encoder(input_ids=token_ids).last_hidden_state,
        }

    return [unet, vae, text_encoder], outputs


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    return latents, torch.randn(2, 77, 768, generator=generator), torch.tensor([PROMPT_IDS])


def probe(side: Side, folder: Path, outputs_path: Path | None) -> Probe:
    """Load one side and read every weight once, timing both (meant to run in a fresh process)."""
    loader = partial(load_ours, mmap=side == "ours-mmap") if side in OURS else load_reference
    if side in OURS:
        import refiners_sd15  # noqa: F401  # pyright: ignore[reportUnusedImport]
    else:
        import diffusers  # noqa: F401  # pyright: ignore[reportUnusedImport]
        import transformers  # noqa: F401  # pyright: ignore[reportUnusedImport]
    return probe_loader(loader, folder, outputs_path)


def probe_loader(loader: Loader, folder: Path, outputs_path: Path | None) -> Probe:
    """Time `loader(folder)`, then reading every weight once; call it right after importing the side's libraries.

    The outputs of the loaded models are saved to `outputs_path` (if given) after the measurements.
    """
    rss_imported = peak_rss()
    with torch.inference_mode():
        wall, cpu = time.perf_counter(), time.process_time()
        models, outputs = loader(folder)
        load_wall, load_cpu = time.perf_counter() - wall, time.process_time() - cpu
        rss_loaded = peak_rss()
        for model in models:
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.sum()
        read_wall, read_cpu = time.perf_counter() - wall, time.process_time() - cpu
        rss_read = peak_rss()
        if outputs_path is not None:  # after the measurements: a forward's activations are not what is measured
            torch.save(outputs(), outputs_path)
    return Probe(load_wall, load_cpu, read_wall, read_cpu, rss_imported, rss_loaded, rss_read)


def run_probe(command: list[str], side: Side, outputs_path: Path | None) -> Probe:
    """Run `command` (a script's `--probe` for `side`) in a fresh process, adding `--outputs`, and read its Probe."""
    if outputs_path is not None:
        command = [*command, "--outputs", str(outputs_path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"loading probe ({side}) failed:\n{result.stderr[-3000:]}")
    return Probe(*json.loads(result.stdout.splitlines()[-1]))


def probe_in_subprocess(side: Side, folder: Path, threads: int, outputs_path: Path | None) -> Probe:
    return run_probe(
        [sys.executable, __file__, "--probe", side, str(folder), "--threads", str(threads)], side, outputs_path
    )


def write_folder(folder: Path) -> None:
    for name, save in (("unet", save_unet), ("vae", save_vae), ("text_encoder", save_text_encoder)):
        log(f"writing the reference {name} with random weights")
        save(folder)


def read_files_once(folder: Path) -> None:
    """Bring the weight files into the page cache, so that no load pays for the first read from disk."""
    for path in sorted(folder.rglob("*.safetensors")):
        with path.open("rb") as file:
            while file.read(1 << 24):
                pass


Probes = dict[Side, list[Probe]]
Differences = dict[Side, dict[str, tuple[float, float]]]
"""Each of our sides -> output name -> (max abs diff from the reference's output, max abs reference)."""


def measure_sides(
    repeats: int, probe_side: Callable[[Side, Path | None], Probe], before_each: Callable[[], None] = lambda: None
) -> tuple[Probes, Differences]:
    """`repeats` rounds of `probe_side(side, outputs_path)` for the three sides, which take turns going first,
    `before_each()` before each load; the outputs saved by the first round are compared with the reference's."""
    sides: tuple[Side, ...] = get_args(Side)
    probes: Probes = {side: [] for side in sides}
    with tempfile.TemporaryDirectory(prefix="load_outputs_") as scratch:
        for repeat in range(repeats):
            shift = repeat % len(sides)
            for side in sides[shift:] + sides[:shift]:
                before_each()
                log(f"load: repeat {repeat + 1}/{repeats}, the {side} side in a fresh process")
                probes[side].append(probe_side(side, Path(scratch, f"{side}.pt") if repeat == 0 else None))
        outputs: dict[Side, Outputs] = {
            side: torch.load(Path(scratch, f"{side}.pt"), weights_only=True) for side in sides
        }
    differences: Differences = {
        side: {
            name: ((outputs[side][name] - expected).abs().max().item(), expected.abs().max().item())
            for name, expected in outputs["reference"].items()
        }
        for side in OURS
    }
    return probes, differences


def measure(folder: Path, repeats: int, threads: int) -> tuple[Probes, Differences]:
    read_files_once(folder)
    return measure_sides(repeats, lambda side, outputs: probe_in_subprocess(side, folder, threads, outputs))


def verdict(low: float, high: float, target: float) -> str:
    """A target on the ratio median judged by its 95% CI: met when the whole CI is under it, missed when over."""
    if high <= target:
        return "met"
    if low > target:
        return "**missed**"
    return "inconclusive"


def load_rows(
    probes: Probes, title: str, value: Callable[[Probe], float], scale: float, target: float | None
) -> list[list[str]]:
    """The rows of `title` in a load table (`LOAD_HEADERS`): each of our sides against the reference (ratio = ours /
    reference per repeat, then the median), judged against `target` (None: no target on this row)."""
    rows: list[list[str]] = []
    digits = 3 if scale == 1.0 else 0
    reference = Timing(tuple(value(p) for p in probes["reference"]))
    for side in OURS:
        c = Comparison(Timing(tuple(value(p) for p in probes[side])), reference, calls_per_round=1)
        low, high = c.ratio_median_ci
        rows.append(
            [
                title,
                SIDE_TITLES[side],
                f"{c.reference.min / scale:,.{digits}f}",
                f"{c.ours.min / scale:,.{digits}f}",
                f"{c.reference.median / scale:,.{digits}f}",
                f"{c.ours.median / scale:,.{digits}f}",
                f"**{c.ratio_median:.3f}x**",
                f"{low:.3f}-{high:.3f}",
                f"<= {target:.2f}x {verdict(low, high, target)}" if target is not None else "",
            ]
        )
    return rows


def accuracy_rows(differences: Differences) -> list[list[str]]:
    """Rows of `ACCURACY_HEADERS`: each output of each of our sides against the reference's."""
    return [
        [name, SIDE_TITLES[side], f"{diff:.2e}", f"{scale:.3g}", f"{diff / scale:.1e}" if scale else "n/a"]
        for side, outputs in differences.items()
        for name, (diff, scale) in outputs.items()
    ]


ACCURACY_HEADERS = ["output", "side", "max abs diff", "max abs reference", "relative"]
CONTRACTS = [
    "Ours is measured twice. By default (`ours (copy)`) `from_pretrained` copies the weights into the process's",
    "memory, reading each file once: a file changed, truncated or deleted afterwards does not reach the model. With",
    "`mmap=True` (`ours, mmap=True`, as `torch.load(mmap=True)`) the parameters are views of the memory-mapped files,",
    "read from the page cache on first use, as diffusers' are: no copy, but the files must stay unchanged while the",
    "model lives (truncating one kills the process with SIGBUS). Both rows are judged on the targets.",
]
"""The paragraph of the load reports that explains our two sides."""


def report(probes: Probes, differences: Differences, env: dict[str, str], folder: str) -> str:
    mib = float(2**20)
    time_rows = [
        *load_rows(probes, "load (wall, s)", lambda p: p.load_wall, 1.0, 1.0),
        *load_rows(probes, "load (CPU, s)", lambda p: p.load_cpu, 1.0, None),
        *load_rows(probes, "load + read every weight (wall, s)", lambda p: p.read_wall, 1.0, None),
        *load_rows(probes, "load + read every weight (CPU, s)", lambda p: p.read_cpu, 1.0, None),
    ]
    memory_rows = [
        *load_rows(probes, "after imports (MiB)", lambda p: p.rss_imported, mib, None),
        *load_rows(probes, "after loading (MiB)", lambda p: p.rss_loaded, mib, None),
        *load_rows(probes, "after reading every weight (MiB)", lambda p: p.rss_read, mib, 1.0),
    ]
    repeats = len(probes["ours"])
    return "\n".join(
        [
            "# Loading Stable Diffusion 1.5: `StableDiffusion_1.from_pretrained` vs diffusers / transformers",
            "",
            "A diffusers folder of the published SD1.5 architecture (UNet, VAE, text encoder: 4.2 GB of float32",
            "safetensors), loaded in float32 on the CPU, each load in a fresh process, "
            f"{repeats} repeat(s) per side, the sides taking turns going first. Ratio = ours / reference (per repeat,",
            "then the median): below 1 means ours is faster or smaller. Files in the page cache. See",
            "`bench/README.md` for the method.",
            "",
            *CONTRACTS,
            "",
            "## Time",
            "",
            "`from_pretrained` alone, and `from_pretrained` followed by reading every weight once, which is when the",
            "weights are in memory (a mapped model reads them from the page cache then).",
            "",
            markdown_table(LOAD_HEADERS, time_rows, "llrrrrrrl"),
            "",
            "## Memory",
            "",
            "Peak resident set size (`VmHWM`) of the loading process. The weights count once they are read: the",
            "last row is the one the target is judged on.",
            "",
            markdown_table(LOAD_HEADERS, memory_rows, "llrrrrrrl"),
            "",
            "## Accuracy",
            "",
            "Outputs of the loaded models on small inputs (UNet: latents (2, 4, 8, 8) at timestep 500; VAE: decode",
            "latents (1, 4, 8, 8); CLIP: one prompt's token ids), computed after the measurements of the first repeat.",
            "",
            markdown_table(ACCURACY_HEADERS, accuracy_rows(differences), "llrrr"),
            "",
            "## Environment",
            "",
            markdown_table(["", ""], [[key, value] for key, value in {**env, "folder": folder}.items()]),
            "",
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="loads per side, each in a fresh process (default: 3)")
    parser.add_argument("--folder", type=Path, help="an existing SD1.5 diffusers folder (default: write one)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/sd15_load.md"))
    parser.add_argument("--probe", nargs=2, metavar=("SIDE", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--outputs", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        side, folder = args.probe
        if side not in get_args(Side):
            parser.error(f"--probe SIDE is one of {get_args(Side)}, got {side!r}")
        print(json.dumps(probe(side, Path(folder), args.outputs)))
        return 0
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    env = {**environment(), **versions()}
    if args.folder is not None:
        if not (args.folder / "unet").is_dir():
            parser.error(f"--folder {args.folder} is not an SD1.5 diffusers folder (no unet/)")
        probes, differences = measure(args.folder, args.repeats, args.threads)
        where = str(args.folder)
    else:
        with tempfile.TemporaryDirectory(prefix="sd15_load_") as folder:
            write_folder(Path(folder))
            probes, differences = measure(Path(folder), args.repeats, args.threads)
        where = "written by the benchmark"
    text = report(probes, differences, env, where)
    write_report(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
