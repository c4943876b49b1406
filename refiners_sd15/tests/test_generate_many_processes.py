"""`refiners generate` for many images in other processes: killed with SIGKILL and run again, and spread over two
processes by torchrun (Gloo on the CPU); on a scaled-down SD1.5 with random weights, 32x32, 2 DDIM steps."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from refiners_sd15 import StableDiffusion_1
from refiners_sd15.testing import small_sd15_components

ARGUMENTS = ("generate", "a cute cat", "--steps", "2", "--solver", "ddim", "--size", "32x32", "--no-progress")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("sd15")
    StableDiffusion_1(**small_sd15_components(4)).save_pretrained(folder)  # pyright: ignore[reportArgumentType]
    return folder


def command(model: Path, out_dir: Path, num_images: int, *extra: str) -> list[str]:
    many = ("--num-images", str(num_images), "--out-dir", str(out_dir), "--seed", "4")
    return [*ARGUMENTS, "--model", str(model), *many, *extra]


def run_module(arguments: list[str], environment: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refiners_core.cli", *arguments],
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )


def outputs(folder: Path) -> dict[str, bytes]:
    """Every file in `folder`, by name: the images' pixels."""
    found: dict[str, bytes] = {}
    for path in sorted(folder.iterdir()):
        with Image.open(path) as image:
            found[path.name] = np.asarray(image.convert("RGB")).tobytes()
    return found


def test_a_run_killed_with_sigkill_resumes_to_the_files_of_an_uninterrupted_run(
    model_folder: Path, tmp_path: Path
) -> None:
    count = 12
    reference = run_module(command(model_folder, tmp_path / "reference", count, "--batch-size", "2"))
    assert reference.returncode == 0, reference.stderr
    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "refiners_core.cli", *command(model_folder, killed, count, "--batch-size", "2")]
    )
    deadline = time.monotonic() + 120
    while not any(killed.glob("*.png")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = sorted(killed.glob("*.png"))
    assert 0 < len(written) < count  # killed in the middle of the run
    assert all(outputs(killed)[path.name] == outputs(tmp_path / "reference")[path.name] for path in written)

    again = run_module(command(model_folder, killed, count, "--batch-size", "2"))

    assert again.returncode == 0, again.stderr
    assert f"{count - len(written)} written, {len(written)} skipped" in again.stdout
    assert outputs(killed) == outputs(tmp_path / "reference")
    assert not list(killed.glob("*.tmp")) and not list(killed.glob(".*.tmp"))


def test_two_torchrun_processes_write_the_files_and_pixels_of_one(model_folder: Path, tmp_path: Path) -> None:
    arguments = command(model_folder, tmp_path / "two", 5, "--batch-size", "2")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}

    with_progress = [argument for argument in arguments if argument != "--no-progress"]
    two = subprocess.run(
        [*launcher, "refiners_core.cli", *with_progress], capture_output=True, text=True, timeout=300, env=environment
    )
    # the same thread count in both runs: MKL's float32 products may round differently with 1 and 2 threads
    one = run_module(command(model_folder, tmp_path / "one", 5, "--batch-size", "2"), environment)

    assert two.returncode == 0, two.stderr
    assert one.returncode == 0, one.stderr
    assert two.stdout.count("5 written, 0 skipped") == 1  # rank 0 alone reports, for both processes
    bars = [line for line in two.stderr.replace("\r", "\n").splitlines() if "generate (2 processes)" in line]
    assert bars and all("/5 " in bar for bar in bars), two.stderr  # one bar, rank 0's, over both ranks' images
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    assert len(outputs(tmp_path / "one")) == 5
