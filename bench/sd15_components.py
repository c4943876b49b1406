"""Stable Diffusion 1.5 components, ours (`refiners_sd15`) against diffusers and transformers, fp32 on CPU.

    python bench/sd15_components.py [--rounds N] [--latent-size N] [--components unet,vae,clip] [--threads N]
        [--output bench/results/sd15_components.md]

Each reference is built from the published SD1.5 config (full architecture) with random weights and written with
its `save_pretrained` into a temporary folder in the diffusers layout (`unet/`, `vae/`, `text_encoder/`). Both
sides then load that folder through their own `from_pretrained`, so they hold the same weights and ours goes
through its real loading path. Timed in interleaved rounds (see `timing.py`), under `torch.inference_mode()`:

- unet: one denoising step, batch 2 (classifier-free guidance), latents (2, 4, N, N), text embedding (2, 77, 768);
- vae: decoding one latent (1, 4, N, N) into an (8N x 8N) image;
- clip: encoding one prompt's token ids (1, 77).

N is `--latent-size` (default 64: 512x512 images). Peak RSS is measured in a fresh process per side and component,
which loads the weights and runs one forward: in one process, memory freed by one side is reused by the other.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, NamedTuple, get_args

import torch
from timing import (
    TIMING_HEADERS,
    Comparison,
    bench_parser,
    compare,
    environment,
    environment_section,
    markdown_table,
    max_abs_diff,
    progress,
    timing_cells,
    write_report,
)
from torch import nn

# The published SD1.5 configs live beside the parity tests, which build their references from them too.
from refiners_sd15.testing import SD15_TEXT_ENCODER_CONFIG as TEXT_ENCODER_CONFIG  # noqa: E402
from refiners_sd15.testing import SD15_UNET_CONFIG as UNET_CONFIG  # noqa: E402
from refiners_sd15.testing import SD15_VAE_CONFIG as VAE_CONFIG  # noqa: E402
from refiners_sd15.testing import randomize_with_seed

Side = Literal["ours", "reference"]
Forward = Callable[[], torch.Tensor]

VAE_SCALING_FACTOR = 0.18215
# refiners_sd15.CLIPTokenizer()("a photograph of an astronaut riding a horse"), padded with end-of-text to 77 ids
PROMPT_IDS = [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558] + [49407] * 68
TIMESTEP = 500


@dataclass(frozen=True)
class Component:
    """One SD1.5 component: how to write its reference weights, load a side and call it on fixed inputs."""

    title: str
    inputs: Callable[[int], str]  # what one call computes on, given the latent size, for the report
    target: float  # the ratio median ours / reference to reach
    default_rounds: int
    save_reference: Callable[[Path], None]  # random weights, written into the diffusers layout folder
    load: Callable[[Side, Path, int], Forward]  # a side loaded from that folder, bound to its inputs
    refiners_0_4: float | None = None  # ratio of Refiners 0.4.0 on a 2-core CPU, quoted


def save_diffusers_reference(model_class: Any, config: dict[str, Any], folder: Path) -> None:
    with torch.device("meta"):  # no initialisation: `randomize_with_seed` draws every parameter
        model: nn.Module = model_class.from_config(config)
    if next(model.buffers(), None) is not None:
        raise RuntimeError(f"{type(model).__name__} has buffers, which `to_empty` would leave uninitialised")
    model = model.to_empty(device="cpu")
    randomize_with_seed(model, seed=0)
    model.save_pretrained(folder, safe_serialization=True)  # pyright: ignore[reportCallIssue]


def save_unet(folder: Path) -> None:
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    save_diffusers_reference(UNet2DConditionModel, UNET_CONFIG, folder / "unet")


def save_vae(folder: Path) -> None:
    from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]

    save_diffusers_reference(AutoencoderKL, VAE_CONFIG, folder / "vae")


def save_text_encoder(folder: Path) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel

    model = CLIPTextModel(CLIPTextConfig.from_dict(TEXT_ENCODER_CONFIG))  # built normally: it has buffers
    randomize_with_seed(model, seed=0)
    model.save_pretrained(folder / "text_encoder")


def reference_pipeline(folder: Path, scheduler: Any, dtype: torch.dtype | None = None) -> Any:
    """diffusers' `StableDiffusionPipeline` on the UNet and VAE that `save_unet` and `save_vae` wrote into `folder`
    (in `dtype`; None: as saved) with `scheduler`, without text encoder, tokenizer or safety checker (the
    benchmarks give it text embeddings), its progress bar off."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    unused: dict[str, Any] = {
        "text_encoder": None,
        "tokenizer": None,
        "safety_checker": None,
        "feature_extractor": None,
    }
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype),
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype),
        scheduler=scheduler,
        **unused,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_unet(side: Side, folder: Path, latent_size: int) -> Forward:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    embedding = torch.randn(2, 77, 768, generator=generator)
    timestep = torch.tensor([TIMESTEP])
    if side == "ours":
        from refiners_sd15 import SD1UNet

        ours = SD1UNet.from_pretrained(folder, dtype=torch.float32).eval()

        def step() -> torch.Tensor:
            ours.set_timestep(timestep)
            ours.set_clip_text_embedding(embedding)
            return ours(latents)

        return step
    from diffusers import UNet2DConditionModel  # pyright: ignore[reportPrivateImportUsage]

    reference = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=torch.float32)
    return lambda: reference(latents, timestep, encoder_hidden_states=embedding).sample


def load_vae(side: Side, folder: Path, latent_size: int) -> Forward:
    latents = torch.randn(1, 4, latent_size, latent_size, generator=torch.Generator().manual_seed(0))
    if side == "ours":
        from refiners_sd15 import SD1Autoencoder

        ours = SD1Autoencoder.from_pretrained(folder, dtype=torch.float32).eval()
        return lambda: ours.decode(latents)
    from diffusers import AutoencoderKL  # pyright: ignore[reportPrivateImportUsage]

    reference = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch.float32)
    return lambda: reference.decode(latents / VAE_SCALING_FACTOR).sample  # pyright: ignore


def load_text_encoder(side: Side, folder: Path, latent_size: int) -> Forward:
    token_ids = torch.tensor([PROMPT_IDS])
    if side == "ours":
        from refiners_sd15 import CLIPTextEncoderL

        ours = CLIPTextEncoderL.from_pretrained(folder, dtype=torch.float32).eval()
        return lambda: ours(token_ids)
    from transformers import CLIPTextModel

    reference = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", dtype=torch.float32).eval()
    return lambda: reference(input_ids=token_ids).last_hidden_state


COMPONENTS: dict[str, Component] = {
    "unet": Component(
        title="UNet step",
        inputs=lambda n: f"latents (2, 4, {n}, {n}), text (2, 77, 768)",
        target=0.95,
        default_rounds=3,
        save_reference=save_unet,
        load=load_unet,
        refiners_0_4=1.02,
    ),
    "vae": Component(
        title="VAE decode",
        inputs=lambda n: f"latents (1, 4, {n}, {n}) -> image {8 * n}x{8 * n}",
        target=0.95,
        default_rounds=3,
        save_reference=save_vae,
        load=load_vae,
    ),
    "clip": Component(
        title="CLIP text encode",
        inputs=lambda n: "token ids (1, 77)",
        target=1.0,
        default_rounds=20,
        save_reference=save_text_encoder,
        load=load_text_encoder,
    ),
}


class PeakRSS(NamedTuple):
    """Peak RSS of a fresh process, in bytes, at three points of its life."""

    torch_imported: int
    loaded: int  # the side's library imported and the weights loaded
    forward: int  # after one forward call


class Result(NamedTuple):
    name: str
    comparison: Comparison
    max_abs_diff: float
    max_abs_reference: float
    rss: dict[Side, PeakRSS]


def measure(name: str, folder: Path, latent_size: int, rounds: int) -> Result:
    component = COMPONENTS[name]
    progress(f"{name}: writing the reference's random weights")
    component.save_reference(folder)
    gc.collect()
    with torch.inference_mode():
        progress(f"{name}: loading both sides")
        ours = component.load("ours", folder, latent_size)
        reference = component.load("reference", folder, latent_size)
        progress(f"{name}: one untimed call per side, whose outputs are compared")
        expected = reference()
        diff = max_abs_diff(ours(), expected)
        scale = expected.abs().max().item()
        del expected
        progress(f"{name}: timing {rounds} rounds")
        # The call above warmed both sides up; one more untimed call each would cost a minute for a 512x512 UNet.
        comparison = compare(ours, reference, rounds=rounds, warmup_rounds=0, calls_per_round=1)
    del ours, reference
    gc.collect()
    rss: dict[Side, PeakRSS] = {}
    for side in get_args(Side):
        progress(f"{name}: peak RSS of the {side} side, in a fresh process")
        rss[side] = probe_in_subprocess(name, side, folder, latent_size)
    return Result(name, comparison, diff, scale, rss)


def probe_in_subprocess(name: str, side: Side, folder: Path, latent_size: int) -> PeakRSS:
    """Peak RSS of `probe` run in a fresh process, with every usable core: it measures memory, not time."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    command = [sys.executable, __file__, "--probe", name, side, str(folder)]
    command += ["--latent-size", str(latent_size), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode:
        raise RuntimeError(f"peak RSS probe of {name} ({side}) failed:\n{result.stderr[-3000:]}")
    return PeakRSS(*json.loads(result.stdout.splitlines()[-1]))


def probe(name: str, side: Side, folder: Path, latent_size: int) -> PeakRSS:
    """Load one side, run one forward and return the peak RSS of this process (meant to run in a fresh one)."""

    def peak() -> int:
        # VmHWM, the peak RSS of this process's memory map. Not `ru_maxrss`: Linux carries it over from the parent
        # through fork and exec, so a child of a big process would report at least its parent's peak.
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
        raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")

    torch_imported = peak()
    with torch.inference_mode():
        forward = COMPONENTS[name].load(side, folder, latent_size)
        loaded = peak()
        forward()
    return PeakRSS(torch_imported, loaded, peak())


def verdict(result: Result) -> str:
    component = COMPONENTS[result.name]
    c = result.comparison
    low, high = c.ratio_median_ci
    line = f"- {component.title}: {c.ratio_median:.3f}x (CI {low:.3f}-{high:.3f}), target {component.target:.2f}x: "
    if high <= component.target:
        return line + "target met"
    if low > component.target:
        return line + "**target missed**"
    return line + f"inconclusive, the interval contains {component.target:.2f}x (more rounds, or a quieter machine)"


def report(results: Sequence[Result], latent_size: int, env: dict[str, str]) -> str:
    def mib(value: int) -> str:
        return f"{value / 2**20:,.0f}"

    timing_rows: list[list[str]] = []
    accuracy_rows: list[list[str]] = []
    memory_rows: list[list[str]] = []
    for name, c, diff, scale, rss in results:
        component = COMPONENTS[name]
        refiners_0_4 = f"{component.refiners_0_4:.2f}x" if component.refiners_0_4 else ""
        timing_rows.append(
            [component.title, str(len(c.ours.samples)), *timing_cells(c), f"<= {component.target:.2f}x", refiners_0_4]
        )
        relative = f"{diff / scale:.1e}" if scale else "n/a"
        accuracy_rows.append([component.title, component.inputs(latent_size), f"{diff:.2e}", f"{scale:.3g}", relative])
        for side in get_args(Side):
            peaks = rss[side]
            ratio = f"{peaks.forward / rss['reference'].forward:.2f}x" if side == "ours" else ""
            memory_rows.append(
                [component.title, side, mib(peaks.torch_imported), mib(peaks.loaded), mib(peaks.forward), ratio]
            )
    timing_headers = ["component", "rounds", *TIMING_HEADERS, "target", "Refiners 0.4.0"]
    accuracy_headers = ["component", "input", "max abs diff", "max abs reference", "relative"]
    memory_headers = [
        "component",
        "side",
        "after `import torch` (MiB)",
        "peak after loading (MiB)",
        "peak after one call (MiB)",
        "ours / reference",
    ]
    return "\n".join(
        [
            "# Stable Diffusion 1.5 components: `refiners_sd15` vs diffusers / transformers",
            "",
            "Ours: `SD1UNet`, `SD1Autoencoder.decode`, `CLIPTextEncoderL`. References: diffusers",
            "`UNet2DConditionModel`, `AutoencoderKL.decode`, transformers `CLIPTextModel`. Published SD1.5 configs,",
            "random weights written with the reference's `save_pretrained` and loaded by both sides from that folder;",
            f"float32, CPU, `torch.inference_mode()`. Latent size {latent_size} ({8 * latent_size}x{8 * latent_size}"
            " images). The UNet step runs batch 2",
            f"(classifier-free guidance) at timestep {TIMESTEP}; our side sets the timestep and the text embedding",
            "inside the timed call, as a denoising loop does at every step.",
            "",
            "## Time",
            "",
            "Process CPU time per call, in interleaved rounds of one call per side, after one untimed call per side",
            "(the one whose outputs are compared). A 512x512 UNet step or decode takes tens of seconds on one core",
            "of this CPU, so these components get few rounds (3 by default: a run takes 11 minutes at load 2-3). With",
            "fewer than 11 rounds the 95% CI of the ratio median is the whole range of the per-round ratios.",
            "Ratio = ours / reference, above 1 means ours is slower.",
            "",
            markdown_table(timing_headers, timing_rows, align="lrrrrrrrrrr"),
            "",
            *(verdict(result) for result in results),
            "",
            "Refiners 0.4.0 is quoted, not re-measured: within noise of diffusers on this 2-core CPU.",
            "",
            "## Accuracy",
            "",
            markdown_table(accuracy_headers, accuracy_rows, align="llrrr"),
            "",
            "## Memory",
            "",
            "Peak resident set size (`VmHWM`) of a fresh process per side and component, which imports torch, then",
            "imports its library and loads the weights from the same folder through its `from_pretrained`, then runs",
            "one call (with every usable core: only memory is measured). Loading counts the library import, the file",
            "reads and any copy the loader makes. A loader whose tensors stay backed by the memory-mapped file only",
            "brings those pages in when the first call reads them: compare the last column.",
            "",
            markdown_table(memory_headers, memory_rows, align="llrrrr"),
            "",
            *environment_section(env),
        ]
    )


def versions() -> dict[str, str]:
    """The versions of the packages compared, and the commit of this repository (editable installs run its tree)."""
    found: dict[str, str] = {}
    for distribution in ("refiners-sd15", "diffusers", "transformers", "accelerate", "safetensors"):
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[distribution] = "not installed"
    found["repository commit"] = source_commit()
    return found


def source_commit() -> str:
    def git(*arguments: str) -> str:
        where = Path(__file__).parent
        return subprocess.run(["git", *arguments], cwd=where, capture_output=True, text=True, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted changes" if changed else commit


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, help="timed rounds per component (default: 3 unet, 3 vae, 20 clip)")
    parser.add_argument("--latent-size", type=int, default=64, help="latent height and width (default: 64)")
    parser.add_argument("--components", default=",".join(COMPONENTS), help="comma-separated (default: unet,vae,clip)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/sd15_components.md"))
    parser.add_argument("--probe", nargs=3, metavar=("COMPONENT", "SIDE", "FOLDER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.probe:
        name, side, folder = args.probe
        print(json.dumps(probe(name, side, Path(folder), args.latent_size)))
        return 0
    names = [name.strip() for name in args.components.split(",") if name.strip()]
    unknown = sorted(set(names) - COMPONENTS.keys())
    if unknown or not names:
        parser.error(f"--components takes a comma-separated subset of {', '.join(COMPONENTS)}, got {args.components!r}")
    if args.latent_size < 8 or args.latent_size % 8:
        parser.error(f"--latent-size must be a multiple of 8 (the UNet halves it 3 times), got {args.latent_size}")
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    env = {**environment(), **versions()}
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="sd15_components_") as folder:
        for name in names:
            rounds = args.rounds or COMPONENTS[name].default_rounds
            results.append(measure(name, Path(folder), args.latent_size, rounds))
    text = report(results, args.latent_size, env)
    write_report(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
