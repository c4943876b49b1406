"""`train_lora`: fine-tune a LoRA on Stable Diffusion 1.5 or SDXL, resumable, on one process or many (torchrun).

Each optimizer step reads the next `batch_size * gradient_accumulation_steps * world_size` samples of the run's data
order (a per-epoch permutation drawn from the seed); each sample's noise and timestep, and its crop with
`data.crop = "random"`, are drawn from the seed and its position in that order. A run's loss curve therefore
depends on the seed, the data and the global batch only: resuming from a checkpoint, or splitting the global batch
across processes, gives the same steps.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import typing
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file  # pyright: ignore[reportUnknownVariableType]
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from refiners_core.fluxion.utils import manual_seed
from refiners_lora import LoraManager
from refiners_sd15.latent_diffusion import LatentDiffusionModel
from refiners_training.checkpoint import (
    LATEST,
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    earlier_checkpoints,
    latest_checkpoint,
    point_latest,
    write_checkpoint,
)
from refiners_training.checkpoint_files import LORA_WEIGHTS, TRAINING_STATE, check_fits, read_checkpoint
from refiners_training.config import ConfigError, MixedPrecision, OptimizationConfig, TrainingConfig
from refiners_training.dataset import CaptionedImages
from refiners_training.diffusion import NoiseSchedule, draw_noise, sample_generator
from refiners_training.distributed import Processes, start_processes, stop_processes
from refiners_training.evaluation import render_prompts, tokenize_prompts
from refiners_training.models import TrainedModel, resolve_kind
from refiners_training.optim import build_optimizer, build_scheduler

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
LOG_FILE = "log.jsonl"
EXPORTS = "exports"
EXPORT_SUFFIXES = {"refiners": ".safetensors", "kohya": ".kohya.safetensors", "diffusers": ".diffusers.safetensors"}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class TrainingError(RuntimeError):
    """A training run that cannot start or go on; the message says why and what to do."""


@dataclass
class TrainingResult:
    """What `train_lora` leaves: the model with the trained LoRA injected (under `config.lora.name`), the step
    reached, the loss of every step this call ran, and the files exported (format -> path, on rank 0 only)."""

    model: LatentDiffusionModel[Any]
    step: int
    losses: dict[int, float] = field(default_factory=lambda: {})
    exports: dict[str, Path] = field(default_factory=lambda: {})
    checkpoint: Path | None = None


def train_lora(config: TrainingConfig, resume: bool = False, fallback: bool = False) -> TrainingResult:
    """Train the LoRA `config` describes; with `resume`, go on from the latest checkpoint in `training.output_dir`
    (with `fallback` too, from the newest one that loads, if the latest is damaged: a warning names each skipped).

    Writes checkpoints (`output_dir/checkpoints/step-NNNNNN/`, the `latest` one named by `checkpoints/latest`),
    evaluation images (`output_dir/samples/step-NNNNNN/NN.png`), the loss of every step (`output_dir/log.jsonl`)
    and, at the end, the LoRA in every `export.formats` (`output_dir/NAME.safetensors`, `NAME.kohya.safetensors`,
    `NAME.diffusers.safetensors`). Under torchrun (WORLD_SIZE > 1) each process takes its share of every global
    batch and rank 0 alone writes files.

    A step whose loss or gradients are not finite stops the run (TrainingError naming the step) before the weights
    change: the checkpoints already written stay, and no checkpoint or export ever holds a non-finite weight.

    The model kind is `model.kind`, or with `"auto"` what `model.base` holds (`refiners_training.models`): SD1.5, or
    SDXL with refiners-sdxl installed, trained on each image's original size and crop (its micro-conditioning).

    The configuration, the model kind, the dataset (every file decoded) and `output_dir` are checked before the model
    loads, and nothing is written before it has loaded.

    Raises ConfigError for a device or mixed precision the machine cannot use or a `model.base` of another kind than
    `model.kind` (or of no kind a LoRA trains on), DatasetError naming a bad file of the dataset, TrainingError if
    `output_dir` is not a usable folder, already holds checkpoints and `resume` is False, `fallback` is given
    without `resume`, or the loss or the gradients stop being finite, CheckpointError naming a checkpoint file that
    is damaged (unreadable, incomplete, non-finite) or does not fit the configured LoRA; the base model's files are
    never written.
    """
    if fallback and not resume:
        raise TrainingError("--fallback (fallback=True) only applies when resuming: add --resume (resume=True)")
    device = resolve_device(config.training)
    check_mixed_precision(config.training.mixed_precision, device)
    kind = resolve_kind(config.model)
    dataset = CaptionedImages(config.data.path, config.data.resolution)
    output_dir = config.training.output_dir
    check_output_dir(output_dir, [f"{config.lora.name}{EXPORT_SUFFIXES[name]}" for name in config.export.formats])
    if not resume:
        refuse_to_overwrite(output_dir / CHECKPOINTS)
    elif not fallback:
        check_resume_point(output_dir / CHECKPOINTS)
    processes = start_processes(device)
    try:
        return _Run(config, kind, device, processes, dataset).train(resume, fallback)
    finally:
        stop_processes(processes)


def check_output_dir(output_dir: Path, exports: Sequence[str] = ()) -> None:
    """TrainingError naming the path if `training.output_dir`, or what the run writes in it (its checkpoints, samples
    and log, and the `exports` file names), cannot be written. Nothing is created here: the run creates the folder
    once the model has loaded, so that a run that cannot start leaves no trace."""
    folders = [(output_dir, True), (output_dir / CHECKPOINTS, True), (output_dir / SAMPLES, True)]
    files = [(output_dir / name, False) for name in (LOG_FILE, *exports)]
    for path, folder in folders + files:
        if path.exists() and path.is_dir() != folder:
            kind = "folder" if folder else "file"
            raise TrainingError(f"`training.output_dir`: {path} must be a {kind} (or not exist yet), but it is not")
    existing = output_dir
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not a folder" if not existing.is_dir() else "is not a folder this user may write in"
        raise TrainingError(f"`training.output_dir`: cannot create or write {output_dir}: {existing} {problem}")


def refuse_to_overwrite(root: Path) -> None:
    """TrainingError if `root` (`output_dir/checkpoints`) holds a checkpoint, or the `latest` pointer of one: a run
    without `resume` never overwrites an earlier run's checkpoints."""
    folders = earlier_checkpoints(root)
    if folders or (root / LATEST).exists():
        latest = f"{folders[0].name} the newest" if folders else f"its {LATEST} pointer"
        raise TrainingError(
            f"{root} already holds checkpoints ({latest}): resume that run with --resume "
            "(train_lora(config, resume=True)) or choose another `training.output_dir`"
        )


def find_latest(root: Path) -> tuple[Path | None, CheckpointError | None]:
    """The checkpoint `root / latest` names (None if there is none), or the error of a damaged pointer: one that
    names no checkpoint folder, or a missing one beside checkpoint folders."""
    try:
        latest = latest_checkpoint(root)
    except CheckpointError as error:
        return None, error
    folders = earlier_checkpoints(root)
    if latest is None and folders:
        message = f"{root / LATEST} is missing, but {root} holds checkpoints ({folders[0].name} the newest)"
        return None, CheckpointError(message)
    return latest, None


def with_fallback_hint(error: CheckpointError, root: Path, checkpoint: Path | None) -> CheckpointError:
    """`error` (of `checkpoint`, or of the `latest` pointer if None) saying that --resume --fallback exists, when
    there is a checkpoint to fall back to."""
    if checkpoint is None:
        return CheckpointError(f"{error} (--resume --fallback goes on from the newest checkpoint that loads)")
    if earlier_checkpoints(root, than=checkpoint_step(checkpoint)):
        return CheckpointError(f"{error} (--resume --fallback goes on from the newest earlier one that loads)")
    return error


def check_resume_point(root: Path) -> None:
    """Before the model loads, when resuming without fallback: the CheckpointError (with its hint) that resuming
    would end in for a damaged `latest` pointer or checkpoint file, as far as it shows without the model."""
    latest, pointer_error = find_latest(root)
    if pointer_error is not None:
        raise with_fallback_hint(pointer_error, root, None)
    if latest is not None:
        try:
            read_checkpoint(latest)
        except CheckpointError as error:
            raise with_fallback_hint(error, root, latest) from error


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


class _Run:
    """One call of `train_lora`: the model, its LoRA, the optimizer and where the run stands."""

    def __init__(
        self,
        config: TrainingConfig,
        kind: type[TrainedModel],
        device: torch.device,
        processes: Processes,
        dataset: CaptionedImages,
    ) -> None:
        self.config, self.device, self.processes = config, device, processes
        training, lora = config.training, config.lora
        self.output_dir = training.output_dir
        self.root = self.output_dir / CHECKPOINTS
        self.dataset = dataset
        manual_seed(training.seed)
        random.seed(training.seed)
        self.trained = kind.load(config.model.base, device)
        self.sd = self.trained.sd
        self.sd.requires_grad_(False)
        self.sd.eval()
        self.manager = LoraManager(self.sd)
        paths = self.trained.layer_paths(lora.layers, lora.train_text_encoder)
        adapters = self.manager.create(lora.name, paths, lora.rank, lora.alpha)
        self.parameters = {
            f"{path}.{name}": parameter
            for path, adapter in adapters.items()
            for name, parameter in adapter.lora.named_parameters()
        }
        for parameter in self.parameters.values():
            parameter.requires_grad_(True)
        denoiser = self.trained.denoiser(lora.train_text_encoder)
        self.model: nn.Module = denoiser
        if processes.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(denoiser, device_ids=device_ids, broadcast_buffers=False)
        self.optimizer = build_optimizer(self.parameters.values(), training)
        self.scheduler = build_scheduler(self.optimizer, training)
        self.scaler = torch.amp.GradScaler(device.type, enabled=training.mixed_precision == "fp16")
        self.noise = NoiseSchedule()
        self.latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # center crops: encoded once per run
        self.tokens: dict[int, torch.Tensor] = {}  # each caption is tokenized once per run
        self.prompt_tokens = tokenize_prompts(self.trained, config.evaluation)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.position = 0  # samples of the data order consumed so far (all processes together)

    @property
    def samples_per_step(self) -> int:
        return self.config.global_batch_size * self.processes.world_size

    def train(self, resume: bool, fallback: bool) -> TrainingResult:
        self.last_checkpoint = self._restore(resume, fallback)
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
                postfix = {"loss": f"{loss:.4f}", "lr": f"{self.scheduler.get_last_lr()[0]:.2e}"}
                progress.set_postfix(postfix)  # pyright: ignore[reportUnknownMemberType]  # tqdm: untyped **kwargs
                if self.step % training.checkpoint_every == 0 or self.step == training.max_steps:
                    self.last_checkpoint = self._checkpoint()
        finally:
            progress.close()
        self._check_weights()
        exports = self._export(self.output_dir) if self.processes.is_main else {}
        self.processes.barrier()
        return TrainingResult(self.sd, self.step, losses, exports, self.last_checkpoint)

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
            encoded = [self._encoded(index, position) for index, position in zip(indices, positions, strict=True)]
            latents = torch.stack([sample_latents for sample_latents, _ in encoded])
            time_ids = torch.stack([sample_time_ids for _, sample_time_ids in encoded])
            tokens = torch.cat([self._tokens_of(index) for index in indices])
            noise, timesteps = draw_noise(training.seed, positions, tuple(latents.shape[1:]))
            noise, timesteps = noise.to(self.device), timesteps.to(self.device)
            noisy = self.noise.add_noise(latents, noise, timesteps)
            last = micro == accumulation - 1
            sync = (
                nullcontext() if last or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync()
            )
            with sync:
                with autocast:
                    prediction = self.model(noisy, timesteps, tokens, time_ids)
                loss = F.mse_loss(prediction.float(), noise.float())
                # torch leaves backward's arguments untyped
                self.scaler.scale(loss / accumulation).backward()  # pyright: ignore[reportUnknownMemberType]
            total += loss.item() / accumulation
        mean = self.processes.mean(total, self.device)
        if not math.isfinite(mean):
            self._stop(f"the loss of step {self.step + 1} is {mean}")
        self.scaler.unscale_(self.optimizer)
        # The norm of every gradient (clipping to infinity leaves them as they are); the same on every process.
        norm = nn.utils.clip_grad_norm_(list(self.parameters.values()), training.max_grad_norm or math.inf)
        if not self.scaler.is_enabled() and not math.isfinite(float(norm)):  # fp16's scaler skips such a step
            self._stop(f"the gradients of step {self.step + 1} are not finite (norm {float(norm)})")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return mean

    @torch.no_grad()
    def _encoded(self, index: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The autoencoder's latents of sample `index` (encoded alone, in float32) and its time ids `(6,)` (original
        size, crop, target size): once per run with center crops, at every `position` of the data order with random
        crops (each drawn from the seed and the position)."""
        random_crop = self.config.data.crop == "random"
        if random_crop or index not in self.latents:
            generator = sample_generator(self.config.training.seed, position, "crop") if random_crop else None
            cropped = self.dataset.crop(index, generator)
            latents = self.sd.lda.encode(cropped.pixels.unsqueeze(0).to(self.device))[0]
            time_ids = torch.tensor(cropped.time_ids, dtype=torch.float32, device=self.device)
            if random_crop:
                return latents, time_ids
            self.latents[index] = (latents, time_ids)
        return self.latents[index]

    def _stop(self, reason: str) -> typing.NoReturn:
        """TrainingError: `reason`, the checkpoint kept and what may help; the weights are left as they are."""
        self.optimizer.zero_grad(set_to_none=True)
        latest = self.last_checkpoint
        kept = f"the latest checkpoint, {latest.name}, is kept" if latest else "no checkpoint was written"
        raise TrainingError(
            f"{reason}: training stopped before updating the weights ({kept}); a lower `training.learning_rate`, "
            "`training.max_grad_norm` or another `training.mixed_precision` may help"
        )

    def _tokens_of(self, index: int) -> torch.Tensor:
        """The token ids of sample `index`'s caption, one row (tokenized once per run)."""
        if index not in self.tokens:
            self.tokens[index] = self.trained.tokenize(self.dataset.samples[index].caption)
        return self.tokens[index]

    def _check_weights(self) -> None:
        """TrainingError naming the first LoRA weight that is not finite: such weights are never written."""
        for key, parameter in self.parameters.items():
            if not bool(torch.isfinite(parameter).all()):
                raise TrainingError(
                    f"the LoRA weight '{key}' is not finite at step {self.step}: training stopped without writing "
                    "a checkpoint or an export; a lower `training.learning_rate` may help"
                )

    def _restore(self, resume: bool, fallback: bool) -> Path | None:
        """Load the latest checkpoint when resuming (with `fallback`, the newest that loads). Returns the one loaded.

        `train_lora` has already refused a run without `resume` over checkpoints (`refuse_to_overwrite`).
        """
        if not resume:
            self._rewrite_log(keep_until=0)
            return None
        folders = earlier_checkpoints(self.root)  # newest first
        latest, pointer_error = find_latest(self.root)
        if pointer_error is not None:
            if not fallback:
                raise with_fallback_hint(pointer_error, self.root, None)
            logger.warning("%s; looking for the newest checkpoint that loads", pointer_error)
        if latest is None and pointer_error is None:
            logger.warning("no checkpoint in %s: training starts from step 0", self.root)
            self._rewrite_log(keep_until=0)
            return None
        candidates = [latest] if latest is not None else []
        if fallback:
            candidates += [
                folder for folder in folders if latest is None or checkpoint_step(folder) < checkpoint_step(latest)
            ]
        errors = [f"{LATEST}: {pointer_error}"] if pointer_error is not None else []
        for candidate in candidates:
            try:
                self._load(candidate)
            except CheckpointError as error:
                if not fallback:
                    raise with_fallback_hint(error, self.root, candidate) from error
                logger.warning("skipping checkpoint %s: %s", candidate.name, error)
                errors.append(f"{candidate.name}: {error}")
                continue
            if errors:
                logger.warning("resuming from checkpoint %s", candidate.name)
                if self.processes.is_main:
                    point_latest(self.root, candidate.name)
            self._rewrite_log(keep_until=self.step)
            return candidate
        raise CheckpointError(f"no checkpoint of {self.root} loads: " + "; ".join(errors))

    def _load(self, checkpoint: Path) -> None:
        """Read, check and apply a checkpoint; CheckpointError naming the file at fault (`read_checkpoint`) before
        any of it is applied, or if applying it fails."""
        tensors, state = read_checkpoint(checkpoint)
        check_fits(checkpoint, tensors, state, self.parameters, self.config.lora.rank)
        state_file = checkpoint / TRAINING_STATE
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            if rng["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(rng["python"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{state_file} does not fit this run: {error!r}") from error
        with torch.no_grad():
            for key, parameter in self.parameters.items():
                parameter.copy_(tensors[key])
        self.step, self.position = int(state["step"]), int(state["position"])

    def _checkpoint(self) -> Path:
        """Write the checkpoint of this step (rank 0) and render the evaluation prompts; every process waits."""
        name = checkpoint_name(self.step)
        self._check_weights()
        if self.processes.is_main:
            write_checkpoint(self.root, name, self._write_checkpoint)
            render_prompts(
                self.trained,
                self.config.evaluation,
                self.prompt_tokens,
                self.config.data.resolution,
                self.output_dir / SAMPLES / name,
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
        # A line cut short by a kill may end in half a character: such lines are dropped, not an error.
        lines = log.read_bytes().decode("utf-8", errors="replace").splitlines() if log.is_file() else []
        kept = [line for line in lines if _logged_step(line) <= keep_until]
        log.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _logged_step(line: str) -> float:
    """The step of a log line; infinity (so that it is dropped) for a line cut short by a kill or otherwise damaged."""
    try:
        step = float(json.loads(line)["step"])
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):  # JSONDecodeError is a ValueError
        return math.inf
    return step if math.isfinite(step) else math.inf
