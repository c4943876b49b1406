"""Loading a Stable Diffusion 1.5 diffusers folder: `StableDiffusion_1.from_pretrained` against diffusers, fp32 on CPU.

    python bench/sd15_load.py [--repeats N] [--folder DIR] [--threads N] [--output bench/results/sd15_load.md]

The folder holds the published SD1.5 architecture (`unet/`, `vae/`, `text_encoder/`, 4.2 GB) with random weights,
each written by its reference library's `save_pretrained` (the writers of `sd15_components.py`), into a temporary
folder unless `--folder` names an existing one. Ours loads it with `StableDiffusion_1.from_pretrained`; the reference
with diffusers' `UNet2DConditionModel.from_pretrained` and `AutoencoderKL.from_pretrained` and transformers'
`CLIPTextModel.from_pretrained`, the three loads `StableDiffusionPipeline.from_pretrained` makes (it also reads a
tokenizer and a scheduler config, which this folder does not hold).

Every load runs in a fresh process, so that its peak RSS is its own and no allocator or import cache is shared;
the sides alternate which goes first from repeat to repeat. Both libraries map the safetensors files into memory
and read a weight from disk when it is first used, so loading alone does not say when the weights are in memory:
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
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
from sd15_components import PROMPT_IDS, VAE_SCALING_FACTOR, save_text_encoder, save_unet, save_vae, versions
from timing import Comparison, Timing, environment, markdown_table, write_report

Side = Literal["ours", "reference"]
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


def load_ours(folder: Path) -> tuple[list[torch.nn.Module], Callable[[], Outputs]]:
    from refiners_sd15 import StableDiffusion_1

    sd = StableDiffusion_1.from_pretrained(folder, dtype=torch.float32)

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
    loader = load_ours if side == "ours" else load_reference
    if side == "ours":
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


def probe_in_subprocess(side: Side, folder: Path, threads: int, outputs_path: Path | None) -> Probe:
    command = [sys.executable, __file__, "--probe", side, str(folder), "--threads", str(threads)]
    if outputs_path is not None:
        command += ["--outputs", str(outputs_path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"loading probe ({side}) failed:\n{result.stderr[-3000:]}")
    return Probe(*json.loads(result.stdout.splitlines()[-1]))


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


def measure(folder: Path, repeats: int, threads: int) -> tuple[dict[Side, list[Probe]], dict[str, tuple[float, float]]]:
    read_files_once(folder)
    probes: dict[Side, list[Probe]] = {"ours": [], "reference": []}
    differences: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory(prefix="sd15_load_outputs_") as scratch:
        for repeat in range(repeats):
            order: tuple[Side, ...] = get_args(Side) if repeat % 2 == 0 else tuple(reversed(get_args(Side)))
            for side in order:
                log(f"repeat {repeat + 1}/{repeats}: loading the {side} side in a fresh process")
                outputs_path = Path(scratch, f"{side}.pt") if repeat == 0 else None
                probes[side].append(probe_in_subprocess(side, folder, threads, outputs_path))
        ours: Outputs = torch.load(Path(scratch, "ours.pt"), weights_only=True)
        reference: Outputs = torch.load(Path(scratch, "reference.pt"), weights_only=True)
    for name, expected in reference.items():
        differences[name] = ((ours[name] - expected).abs().max().item(), expected.abs().max().item())
    return probes, differences


def comparison(probes: dict[Side, list[Probe]], value: Callable[[Probe], float]) -> Comparison:
    ours = Timing(tuple(value(p) for p in probes["ours"]))
    reference = Timing(tuple(value(p) for p in probes["reference"]))
    return Comparison(ours, reference, calls_per_round=1)


def report(
    probes: dict[Side, list[Probe]], differences: dict[str, tuple[float, float]], env: dict[str, str], folder: str
) -> str:
    def row(title: str, value: Callable[[Probe], float], unit: str, scale: float, target: bool) -> list[str]:
        c = comparison(probes, value)
        low, high = c.ratio_median_ci
        verdict = ("met" if high <= 1.0 else "missed" if low > 1.0 else "inconclusive") if target else ""
        digits = 3 if unit == "s" else 0
        return [
            title,
            f"{c.reference.min / scale:,.{digits}f}",
            f"{c.ours.min / scale:,.{digits}f}",
            f"{c.reference.median / scale:,.{digits}f}",
            f"{c.ours.median / scale:,.{digits}f}",
            f"**{c.ratio_median:.3f}x**",
            f"{low:.3f}-{high:.3f}",
            "<= 1.00x " + verdict if target else "",
        ]

    mib = float(2**20)
    time_rows = [
        row("load (wall, s)", lambda p: p.load_wall, "s", 1.0, True),
        row("load (CPU, s)", lambda p: p.load_cpu, "s", 1.0, False),
        row("load + read every weight (wall, s)", lambda p: p.read_wall, "s", 1.0, False),
        row("load + read every weight (CPU, s)", lambda p: p.read_cpu, "s", 1.0, False),
    ]
    memory_rows = [
        row("after imports (MiB)", lambda p: p.rss_imported, "MiB", mib, False),
        row("after loading (MiB)", lambda p: p.rss_loaded, "MiB", mib, False),
        row("after reading every weight (MiB)", lambda p: p.rss_read, "MiB", mib, True),
    ]
    headers = ["", "reference min", "ours min", "reference median", "ours median", "ratio median", "95% CI", "target"]
    accuracy_rows = [
        [name, f"{diff:.2e}", f"{scale:.3g}", f"{diff / scale:.1e}" if scale else "n/a"]
        for name, (diff, scale) in differences.items()
    ]
    repeats = len(probes["ours"])
    return "\n".join(
        [
            "# Loading Stable Diffusion 1.5: `StableDiffusion_1.from_pretrained` vs diffusers / transformers",
            "",
            "A diffusers folder of the published SD1.5 architecture (UNet, VAE, text encoder: 4.2 GB of float32",
            "safetensors), loaded in float32 on the CPU, each load in a fresh process, "
            f"{repeats} repeat(s) per side, alternating which side goes first. Ratio = ours / reference (per repeat,",
            "then the median): below 1 means ours is faster or smaller. Files in the page cache. See",
            "`bench/README.md` for the method.",
            "",
            "## Time",
            "",
            "`from_pretrained` alone (both sides leave the weights memory-mapped, to be read on first use), and",
            "`from_pretrained` followed by reading every weight once, which is when the weights are in memory.",
            "",
            markdown_table(headers, time_rows, "lrrrrrrl"),
            "",
            "## Memory",
            "",
            "Peak resident set size (`VmHWM`) of the loading process. The weights count once they are read: the",
            "last row is the one the target is judged on.",
            "",
            markdown_table(headers, memory_rows, "lrrrrrrl"),
            "",
            "## Accuracy",
            "",
            "Outputs of the loaded models on small inputs (UNet: latents (2, 4, 8, 8) at timestep 500; VAE: decode",
            "latents (1, 4, 8, 8); CLIP: one prompt's token ids), computed after the measurements of the first repeat.",
            "",
            markdown_table(["component", "max abs diff", "max abs reference", "relative"], accuracy_rows, "lrrr"),
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
