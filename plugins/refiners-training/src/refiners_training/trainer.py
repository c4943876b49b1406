"""`train_lora`: fine-tune a LoRA on Stable Diffusion 1.5, resumable, on one process or many (torchrun).

Each optimizer step reads the next `batch_size * gradient_accumulation_steps * world_size` samples of the run's data
order (a per-epoch permutation drawn from the seed); each sample's noise and timestep are drawn from the seed and
its position in that order. A run's loss curve therefore depends on the seed, the data and the global batch only:
resuming from a checkpoint, or splitting the global batch across processes, gives the same steps.
"""

from __future__ import annotations

import json
import logging
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from refiners_lora import LoraManager
from refiners_sd15 import CLIPTextEncoderL, SD1UNet, StableDiffusion_1
from refiners_training.checkpoint import CheckpointError, checkpoint_name, latest_checkpoint, write_checkpoint
from refiners_training.config import ConfigError, MixedPrecision, OptimizationConfig, TrainingConfig
from refiners_training.dataset import CaptionedImages
from refiners_training.diffusion import NoiseSchedule, draw_noise
from refiners_training.distributed import Processes, start_processes, stop_processes
from refiners_training.evaluation import render_prompts
from refiners_training.layers import lora_layer_paths
from refiners_training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LOG_FILE = "log.jsonl"
LORA_WEIGHTS = "lora_weights.safetensors"
TRAINING_STATE = "training_state.pt"
EXPORTS = "exports"
EXPORT_SUFFIXES = {"refiners": ".safetensors", "kohya": ".kohya.safetensors", "diffusers": ".diffusers.safetensors"}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(RuntimeError):
    """A training run that cannot start or go on; the message says why and what to do."""


@dataclass
class TrainingResult:
    """What `train_lora` leaves: the model with the trained LoRA injected (under `config.lora.name`), the step
    reached, the loss of every step this call ran, and the files exported (format -> path, on rank 0 only)."""

    model: StableDiffusion_1
    step: int
    losses: dict[int, float] = field(default_factory=lambda: {})
    exports: dict[str, Path] = field(default_factory=lambda: {})
    checkpoint: Path | None = None


def train_lora(config: TrainingConfig, resume: bool = False) -> TrainingResult:
    """Train the LoRA `config` describes; with `resume`, go on from the latest checkpoint in `training.output_dir`.

    Writes checkpoints (`output_dir/checkpoints/step-NNNNNN/`, the `latest` one named by `checkpoints/latest`),
    evaluation images (`output_dir/samples/step-NNNNNN/NN.png`), the loss of every step (`output_dir/log.jsonl`)
    and, at the end, the LoRA in every `export.formats` (`output_dir/NAME.safetensors`, `NAME.kohya.safetensors`,
    `NAME.diffusers.safetensors`). Under torchrun (WORLD_SIZE > 1) each process takes its share of every global
    batch and rank 0 alone writes files.

    Raises ConfigError for a device or mixed precision the machine cannot use, DatasetError naming a bad file of
    the dataset, TrainingError if `output_dir` is not a usable folder or already holds checkpoints and `resume` is
    False, CheckpointError naming a checkpoint file that does not fit the configured LoRA; the base model's files are
    never written.
    """
    prepare_output_dir(config.training.output_dir)
    device = resolve_device(config.training)
    check_mixed_precision(config.training.mixed_precision, device)
    processes = start_processes(device)
    try:
        return _Run(config, device, processes).train(resume)
    finally:
        stop_processes(processes)


def prepare_output_dir(output_dir: Path) -> None:
    """Create `training.output_dir`; TrainingError naming the path if it, or what the run writes in it, cannot be."""
    for path, folder in ((output_dir, True), (output_dir / CHECKPOINTS, True), (output_dir / LOG_FILE, False)):
        if path.exists() and path.is_dir() != folder:
            kind = "folder" if folder else "file"
            raise TrainingError(f"`training.output_dir`: {path} must be a {kind} (or not exist yet), but it is not")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise TrainingError(f"`training.output_dir`: cannot create the folder {output_dir}: {error}") from error


def resolve_device(config: OptimizationConfig) -> torch.device:
    """`training.device` as a torch device: under torchrun, CUDA device LOCAL_RANK. Raises ConfigError without CUDA."""
    choice = config.device
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("`training.device` is 'cuda' but CUDA is not available on this machine")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def check_mixed_precision(mixed_precision: MixedPrecision, device: torch.device) -> None:
    """Raise ConfigError if `device` cannot run `training.mixed_precision` (fp16 needs CUDA, bf16 a GPU that has it)."""
    if mixed_precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            f"`training.mixed_precision` = 'fp16' needs a CUDA device, but training runs on {device.type}: "
            "float16 autocast is not supported there; use 'bf16' or 'no'"
        )
    if mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("`training.mixed_precision` = 'bf16' but this GPU does not support bfloat16; use 'fp16'")


class Denoiser(nn.Module):
    """The trained computation: captions -> CLIP text embedding -> the UNet's noise prediction for noisy latents.

    One module, so that DistributedDataParallel averages the gradients of every trained LoRA, text encoder included.
    """

    def __init__(self, unet: SD1UNet, clip_text_encoder: CLIPTextEncoderL, train_text_encoder: bool) -> None:
        super().__init__()
        self.unet = unet
        self.clip_text_encoder = clip_text_encoder
        self.train_text_encoder = train_text_encoder

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, captions: list[str]) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_text_encoder and torch.is_grad_enabled()):
            embedding = self.clip_text_encoder(captions)
        self.unet.set_timestep(timesteps)
        self.unet.set_clip_text_embedding(embedding)
        return self.unet(latents)


class _Run:
    """One call of `train_lora`: the model, its LoRA, the optimizer and where the run stands."""

    def __init__(self, config: TrainingConfig, device: torch.device, processes: Processes) -> None:
        self.config, self.device, self.processes = config, device, processes
        training, lora = config.training, config.lora
        self.output_dir = training.output_dir
        self.root = self.output_dir / CHECKPOINTS
        self.dataset = CaptionedImages(config.data.path, config.data.resolution)
        torch.manual_seed(training.seed)
        random.seed(training.seed)
        self.sd = StableDiffusion_1.from_pretrained(config.model.base, device=device, dtype=torch.float32)
        self.sd.requires_grad_(False)
        self.sd.eval()
        self.manager = LoraManager(self.sd)
        paths = lora_layer_paths(self.sd, lora.layers, lora.train_text_encoder)
        adapters = self.manager.create(lora.name, paths, lora.rank, lora.alpha)
        self.parameters = {
            f"{path}.{name}": parameter
            for path, adapter in adapters.items()
            for name, parameter in adapter.lora.named_parameters()
        }
        for parameter in self.parameters.values():
            parameter.requires_grad_(True)
        denoiser = Denoiser(self.sd.unet, self.sd.clip_text_encoder, lora.train_text_encoder)
        self.model: nn.Module = denoiser
        if processes.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(denoiser, device_ids=device_ids, broadcast_buffers=False)
        self.optimizer = build_optimizer(self.parameters.values(), training)
        self.scheduler = build_scheduler(self.optimizer, training)
        self.scaler = torch.amp.GradScaler(device.type, enabled=training.mixed_precision == "fp16")
        self.noise = NoiseSchedule()
        self.latents: dict[int, torch.Tensor] = {}
        self.step = 0
        self.position = 0  # samples of the data order consumed so far (all processes together)

    @property
    def samples_per_step(self) -> int:
        return self.config.global_batch_size * self.processes.world_size

    def train(self, resume: bool) -> TrainingResult:
        checkpoint = self._restore(resume)
        training = self.config.training
        losses: dict[int, float] = {}
        progress = tqdm(
            total=training.max_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not self.processes.is_main,
        )
        try:
            while self.step < training.max_steps:
                loss = self._optimizer_step()
                self.step += 1
                self.position += self.samples_per_step
                losses[self.step] = loss
                self._log(loss)
                progress.update(1)
                progress.set_postfix(loss=f"{loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}")
                if self.step % training.checkpoint_every == 0 or self.step == training.max_steps:
                    checkpoint = self._checkpoint()
        finally:
            progress.close()
        exports = self._export(self.output_dir) if self.processes.is_main else {}
        self.processes.barrier()
        return TrainingResult(self.sd, self.step, losses, exports, checkpoint)

    def _optimizer_step(self) -> float:
        """Forward and backward every micro-batch of the next global batch, then one optimizer step; the mean loss."""
        training = self.config.training
        accumulation = training.gradient_accumulation_steps
        autocast = torch.autocast(
            self.device.type,
            dtype=AUTOCAST_DTYPES.get(training.mixed_precision, torch.float32),
            enabled=training.mixed_precision != "no",
        )
        total = 0.0
        for micro in range(accumulation):
            start = self.position + (micro * self.processes.world_size + self.processes.rank) * training.batch_size
            positions = list(range(start, start + training.batch_size))
            indices = self.dataset.indices(training.seed, start, training.batch_size)
            latents = torch.stack([self._latents_of(index) for index in indices])
            captions = [self.dataset.samples[index].caption for index in indices]
            noise, timesteps = draw_noise(training.seed, positions, tuple(latents.shape[1:]))
            noise, timesteps = noise.to(self.device), timesteps.to(self.device)
            noisy = self.noise.add_noise(latents, noise, timesteps)
            last = micro == accumulation - 1
            sync = (
                nullcontext() if last or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync()
            )
            with sync:
                with autocast:
                    prediction = self.model(noisy, timesteps, captions)
                loss = F.mse_loss(prediction.float(), noise.float())
                self.scaler.scale(loss / accumulation).backward()
            total += loss.item() / accumulation
        self.scaler.unscale_(self.optimizer)
        if training.max_grad_norm > 0:
            nn.utils.clip_grad_norm_(list(self.parameters.values()), training.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.processes.mean(total, self.device)

    @torch.no_grad()
    def _latents_of(self, index: int) -> torch.Tensor:
        """The autoencoder's latents of sample `index` (encoded alone, in float32, once per run)."""
        if index not in self.latents:
            image, _ = self.dataset[index]
            self.latents[index] = self.sd.lda.encode(image.unsqueeze(0).to(self.device))[0]
        return self.latents[index]

    def _restore(self, resume: bool) -> Path | None:
        """Load the latest checkpoint when resuming; refuse to overwrite one otherwise. Returns the one loaded."""
        checkpoint = latest_checkpoint(self.root)
        if checkpoint is not None and not resume:
            raise TrainingError(
                f"{self.root} already holds checkpoints (latest: {checkpoint.name}): resume that run with --resume "
                "(train_lora(config, resume=True)) or choose another `training.output_dir`"
            )
        if checkpoint is None:
            if resume:
                logger.warning("no checkpoint in %s: training starts from step 0", self.root)
            self._rewrite_log(keep_until=0)
            return None
        self._load(checkpoint)
        self._rewrite_log(keep_until=self.step)
        return checkpoint

    def _load(self, checkpoint: Path) -> None:
        weights_file = checkpoint / LORA_WEIGHTS
        try:
            tensors = load_file(weights_file)
            state: dict[str, Any] = torch.load(checkpoint / TRAINING_STATE, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as error:
            raise CheckpointError(f"cannot read checkpoint {checkpoint}: {error}") from error
        missing, unexpected = sorted(set(self.parameters) - set(tensors)), sorted(set(tensors) - set(self.parameters))
        if missing or unexpected:
            raise CheckpointError(
                f"{weights_file} does not fit the configured LoRA (lora.layers, lora.train_text_encoder): "
                f"{len(missing)} weight(s) missing (e.g. {missing[:1]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:1]})"
            )
        for key, parameter in self.parameters.items():
            if tensors[key].shape != parameter.shape:
                raise CheckpointError(
                    f"{weights_file}: '{key}' has shape {tuple(tensors[key].shape)}, the configured LoRA "
                    f"(lora.rank = {self.config.lora.rank}) needs {tuple(parameter.shape)}"
                )
        with torch.no_grad():
            for key, parameter in self.parameters.items():
                parameter.copy_(tensors[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        self.step, self.position = int(state["step"]), int(state["position"])

    def _checkpoint(self) -> Path:
        """Write the checkpoint of this step (rank 0) and render the evaluation prompts; every process waits."""
        name = checkpoint_name(self.step)
        if self.processes.is_main:
            write_checkpoint(self.root, name, self._write_checkpoint)
            render_prompts(
                self.sd, self.config.evaluation, self.config.data.resolution, self.output_dir / SAMPLES / name
            )
        self.processes.barrier()
        return self.root / name

    def _write_checkpoint(self, folder: Path) -> None:
        weights = {key: parameter.detach().cpu().contiguous() for key, parameter in self.parameters.items()}
        save_file(weights, folder / LORA_WEIGHTS)
        state = {
            "step": self.step,
            "position": self.position,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "python": random.getstate(),
            },
        }
        torch.save(state, folder / TRAINING_STATE)
        if self.config.export.at_checkpoints:
            self._export(folder / EXPORTS)

    def _export(self, folder: Path) -> dict[str, Path]:
        """Write the LoRA in every configured format into `folder`; format -> path."""
        folder.mkdir(parents=True, exist_ok=True)
        name = self.config.lora.name
        exports: dict[str, Path] = {}
        for format in self.config.export.formats:  # noqa: A001
            path = folder / f"{name}{EXPORT_SUFFIXES[format]}"
            self.manager.save(name, path, format=format)
            exports[format] = path
        return exports

    def _log(self, loss: float) -> None:
        if self.processes.is_main:
            entry = {"step": self.step, "loss": loss, "lr": self.scheduler.get_last_lr()[0]}
            with open(self.output_dir / LOG_FILE, "a", encoding="utf-8") as file:
                file.write(json.dumps(entry) + "\n")

    def _rewrite_log(self, keep_until: int) -> None:
        """Drop the log entries past step `keep_until` (steps a stopped run took after its last checkpoint)."""
        if not self.processes.is_main:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        log = self.output_dir / LOG_FILE
        lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
        kept = [line for line in lines if _logged_step(line) <= keep_until]
        log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _logged_step(line: str) -> float:
    """The step of a log line; infinity for a line cut short by a kill, so that it is dropped."""
    try:
        return float(json.loads(line)["step"])
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")
