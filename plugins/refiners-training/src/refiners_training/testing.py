"""Helpers for tests of refiners-training: small image datasets, TOML configurations of training runs (the small
SD1.5 folder they train is `refiners_sd15.testing.DiffusersReferences`'s), what a run leaves (losses, checkpoint
weights), and runs killed or spread over processes. Nothing here is used at runtime."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import load_file  # pyright: ignore[reportUnknownVariableType]  # untyped PathLike

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
