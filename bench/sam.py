"""Segment Anything ViT-B image encoder, ours (`refiners_sam`) against segment-anything, fp32 on CPU.

    python bench/sam.py [--rounds N] [--threads N] [--output bench/results/sam.md]

The reference is `sam_model_registry["vit_b"](checkpoint=None)` with random weights (the parity tests' `randomize`),
written with `torch.save(state_dict)` as the official checkpoints are; ours loads that file with
`SegmentAnything.from_pretrained`. One call encodes one normalised, padded (1, 3, 1024, 1024) image into its
(1, 256, 64, 64) embedding, under `torch.inference_mode()`, timed in interleaved rounds (see `timing.py`). Peak RSS
is measured in a fresh process per side, which loads the weights and encodes one image.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

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

# The reference and its random weights come from the parity tests' helpers, which also make segment-anything
# importable without torchvision.
from refiners_sam.testing import build_reference

Side = Literal["ours", "reference"]
TARGET = 0.75


def load(side: Side, checkpoint: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The image encoder of one side, loaded from the checkpoint."""
    if side == "ours":
        from refiners_sam import SegmentAnything

        return SegmentAnything.from_pretrained(checkpoint).image_encoder
    from refiners_sam.testing import sam_model_registry

    reference = sam_model_registry["vit_b"](checkpoint=None)
    reference.load_state_dict(torch.load(checkpoint, weights_only=True))
    return reference.image_encoder.eval()


def pixels() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, 1024, 1024, generator=generator)


def peak_rss_mib() -> float:
    # VmHWM, the peak RSS of this process (not ru_maxrss, which Linux carries over from the parent).
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS is measured on Linux only")


def probe(side: Side, checkpoint: Path) -> None:
    """Child process: print the peak RSS after import, after loading, after one call."""
    imported = peak_rss_mib()
    encoder = load(side, checkpoint)
    loaded = peak_rss_mib()
    with torch.inference_mode():
        encoder(pixels())
    print(f"{imported} {loaded} {peak_rss_mib()}")


def probe_in_subprocess(side: Side, checkpoint: Path) -> tuple[float, float, float]:
    command = [sys.executable, __file__, "--probe", side, str(checkpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory probe for {side} failed:\n{result.stderr}")
    imported, loaded, called = (float(value) for value in result.stdout.split())
    return imported, loaded, called


def report(comparison: Comparison, difference: float, scale: float, rss: dict[Side, tuple[float, float, float]]) -> str:
    low, high = comparison.ratio_median_ci
    verdict = "met" if high <= TARGET else "missed" if low > TARGET else "inconclusive"
    time_row = [str(len(comparison.ratios)), *timing_cells(comparison), f"<= {TARGET:.2f}x"]
    memory_rows = [
        [
            side,
            *(f"{value:,.0f}" for value in rss[side]),
            f"{rss['ours'][2] / rss['reference'][2]:.2f}x" if side == "ours" else "",
        ]
        for side in ("ours", "reference")
    ]
    env = environment()
    return "\n".join(
        [
            "# Segment Anything ViT-B image encoder: `refiners_sam` vs segment-anything",
            "",
            "One call encodes a normalised, padded (1, 3, 1024, 1024) image into the (1, 256, 64, 64) embedding,",
            "float32, CPU, `torch.inference_mode()`. Same random weights on both sides (a `torch.save(state_dict)`",
            "checkpoint of `sam_model_registry['vit_b']`, read by ours through `SegmentAnything.from_pretrained`).",
            "",
            "## Time",
            "",
            "Process CPU time per call, interleaved rounds of one call per side, after one untimed call per side (the",
            "one whose outputs are compared). Ratio = ours / reference, below 1 means ours is faster.",
            "",
            markdown_table(["rounds", *TIMING_HEADERS, "target"], [time_row], "rrrrrrrrr"),
            "",
            f"- ratio median {comparison.ratio_median:.3f}x (CI {low:.3f}-{high:.3f}), target {TARGET:.2f}x: "
            f"target {verdict}",
            "",
            "## Accuracy",
            "",
            f"max abs diff {difference:.2e}, max abs reference {scale:.2f}, relative {difference / scale:.1e}.",
            "",
            "## Memory",
            "",
            "Peak resident set size (`VmHWM`) of a fresh process per side: after importing torch and the library,",
            "after loading the checkpoint, after encoding one image (with every usable core: only memory is measured).",
            "",
            markdown_table(
                ["side", "after imports (MiB)", "after loading (MiB)", "after one call (MiB)", "ours / reference"],
                memory_rows,
                "lrrrr",
            ),
            "",
            *environment_section(env),
        ]
    )


def main() -> int:
    parser = bench_parser(__doc__ or "")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    parser.add_argument("--output", type=Path, default=Path("bench/results/sam.md"))
    parser.add_argument("--probe", nargs=2, metavar=("SIDE", "CHECKPOINT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        probe(args.probe[0], Path(args.probe[1]))
        return 0
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = Path(folder) / "sam_vit_b_random.pth"
        torch.save(build_reference("vit_b", seed=0).state_dict(), checkpoint)
        progress("checkpoint written; memory probes")
        rss: dict[Side, tuple[float, float, float]] = {
            side: probe_in_subprocess(side, checkpoint) for side in ("ours", "reference")
        }
        ours, reference = load("ours", checkpoint), load("reference", checkpoint)
        x = pixels()
        with torch.inference_mode():
            progress("first call per side")
            expected = reference(x)
            difference = max_abs_diff(ours(x), expected)
            scale = expected.abs().max().item()
            if difference > 1e-3 * scale:
                print(f"outputs differ: max abs diff {difference} for a max of {scale}", file=sys.stderr)
                return 1
            progress(f"timing {args.rounds} rounds")
            comparison = compare(
                lambda: ours(x), lambda: reference(x), rounds=args.rounds, warmup_rounds=0, calls_per_round=1
            )
    text = report(comparison, difference, scale, rss)
    write_report(text, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
