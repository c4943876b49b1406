"""Helpers for tests of refiners-training: small image datasets, TOML configurations of training runs (the small
SD1.5 folder they train is `refiners_sd15.testing.DiffusersReferences`'s), what a run leaves (losses, checkpoint
weights), and runs killed or spread over processes. Nothing here is used at runtime."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Generator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file  # pyright: ignore[reportUnknownVariableType]  # untyped PathLike

from refiners_training.config import TrainingConfig

RED = (230, 30, 30)
"""The colour of `write_colour_patches`' images."""


def write_colour_patches(folder: Path, count: int = 3, scale: int = 1) -> Path:
    """`count` images of the same red patch at different sizes (`scale` times (16 + 4i) x (16 or 24) pixels, so
    resizing and cropping apply), one caption."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        size = (scale * (16 + 4 * index), scale * (16 + 8 * (index % 2)))
        Image.new("RGB", size, RED).save(folder / f"patch-{index}.png")
        (folder / f"patch-{index}.txt").write_text("a red square", encoding="utf-8")
    return folder


def toml_config(model: Path, data: Path, output_dir: Path, /, **sections: dict[str, Any]) -> str:
    """A TOML configuration for the small model and dataset; `sections` add or replace keys per section."""
    values: dict[str, dict[str, Any]] = {
        "model": {"base": str(model)},
        "data": {"path": str(data), "resolution": 16},
        "training": {"output_dir": str(output_dir)},
    }
    for name, keys in sections.items():
        values.setdefault(name, {}).update(keys)
    lines: list[str] = []
    for name, keys in values.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
    return "\n".join(lines) + "\n"


def write_config(folders: Mapping[str, Path], name: str, **sections: dict[str, Any]) -> tuple[Path, TrainingConfig]:
    """Write `folders["root"] / f"{name}.toml"`, the `toml_config` training `folders["model"]` on `folders["data"]`
    into `folders["root"] / name` with `sections`, and read it back: its path and its `TrainingConfig`."""
    path = folders["root"] / f"{name}.toml"
    path.write_text(
        toml_config(folders["model"], folders["data"], folders["root"] / name, **sections), encoding="utf-8"
    )
    return path, TrainingConfig.from_toml(path)


RESUMABLE_RUN: dict[str, dict[str, Any]] = {
    "lora": {"rank": 2},
    "training": {
        "max_steps": 4,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "learning_rate": 1e-3,
        "lr_scheduler": "linear",
        "lr_warmup_steps": 1,
        "checkpoint_every": 2,
        "seed": 3,
    },
    "export": {"formats": ["refiners"]},
}
"""The sections of a short run (4 steps of 2 samples, 2 accumulated, a checkpoint every 2 steps) that the tests kill,
resume or spread over processes, and compare with the same run left alone."""


@contextmanager
def one_torch_thread() -> Generator[None]:
    """torch on one thread within the block (small models run faster so, above all on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_process(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Run `command` (a training process) with `OMP_NUM_THREADS=1`, its output captured as text, within 240 s."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240, check=False)


def assert_same_checkpoint(reference_dir: Path, output_dir: Path, step: int) -> None:
    """Assert that the checkpoints of `step` of the runs writing to `reference_dir` and `output_dir` hold the same LoRA
    weights, bit for bit."""
    expected = checkpoint_weights(reference_dir, step)
    resumed = checkpoint_weights(output_dir, step)
    assert expected.keys() == resumed.keys() and all(torch.equal(resumed[key], expected[key]) for key in expected)


def checkpoint_weights(output_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The LoRA weights of the checkpoint of `step` of the run writing to `output_dir`."""
    return load_file(output_dir / "checkpoints" / f"step-{step:06d}" / "lora_weights.safetensors")


def logged_losses(output_dir: Path) -> list[float]:
    """The losses of the run writing to `output_dir`, in step order, as its `log.jsonl` records them."""
    return [json.loads(line)["loss"] for line in (output_dir / "log.jsonl").read_text().splitlines()]


KILLED_AT_STEP_4 = """
import os, signal, sys
from refiners_core.cli import main
from refiners_training import trainer

write = trainer._Run._write_checkpoint

def killed_at_step_4(run, folder):
    if run.step < 4:
        return write(run, folder)
    (folder / trainer.LORA_WEIGHTS).write_bytes(b"half a file")
    os.kill(os.getpid(), signal.SIGKILL)  # no Python cleanup, no finally block, no flush

trainer._Run._write_checkpoint = killed_at_step_4
main(["train", "lora", sys.argv[1]])
"""
"""A Python program (`python -c KILLED_AT_STEP_4 CONFIG`) that runs `refiners train lora CONFIG` and kills itself
with SIGKILL halfway through writing the checkpoint of step 4."""


def torchrun_command(config: Path, processes: int) -> list[str]:
    """The command that trains the LoRA of the TOML file `config` in `processes` processes on this machine, under
    `torch.distributed.run`, on a free local port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "refiners_training",
        "lora",
        str(config),
    ]


def assert_resumes_after_sigkill(config: Path, output_dir: Path, reference_dir: Path, losses: list[float]) -> None:
    """Run `refiners train lora config` (writing to `output_dir`) in a process that SIGKILLs itself halfway through
    the checkpoint of step 4 (`KILLED_AT_STEP_4`) and assert it died so, the checkpoint of step 2 the latest; then
    resume it in this process and assert it logs `losses` exactly and ends with the weights of step 4 of the run
    writing to `reference_dir`, bit for bit."""
    from refiners_core.cli import main

    completed = run_process([sys.executable, "-c", KILLED_AT_STEP_4, str(config)])
    assert completed.returncode == -9, completed.stderr[-4000:]
    assert (output_dir / "checkpoints" / "latest").read_text().strip() == "step-000002"

    assert main(["train", "lora", str(config), "--resume"]) == 0
    assert logged_losses(output_dir) == losses  # exactly
    assert_same_checkpoint(reference_dir, output_dir, 4)


def run_under_torchrun(
    config: Path, output_dir: Path, reference_dir: Path, losses: list[float]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Train the LoRA of `config` (writing to `output_dir`) in 2 processes under torchrun and assert it succeeds and
    logs `losses` within a relative 1e-5; return the LoRA weights of step 4 of the run writing to `reference_dir` and
    of this one, after asserting they have the same keys."""
    import pytest

    completed = run_process(torchrun_command(config, 2))
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert logged_losses(output_dir) == pytest.approx(losses, rel=1e-5)
    expected = checkpoint_weights(reference_dir, 4)
    distributed = checkpoint_weights(output_dir, 4)
    assert expected.keys() == distributed.keys()
    return expected, distributed
