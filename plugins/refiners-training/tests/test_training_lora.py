"""LoRA training end to end on a small SD1.5 with random weights (a diffusers folder written by `save_pretrained`):
the loss goes down on a learnable toy task, the base model stays frozen and untouched, exports load in refiners and
in diffusers with equal outputs, a resumed run and a 2-process torchrun run reproduce an uninterrupted one."""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from refiners_core.cli import main
from refiners_lora import LoraManager
from refiners_sd15 import DDIM, CLIPTokenizer, StableDiffusion_1
from refiners_sd15.testing import DiffusersReferences
from refiners_training import CheckpointError, TrainingConfig, TrainingResult, train_lora
from refiners_training import models as models_module
from refiners_training import trainer as trainer_module
from refiners_training.testing import (
    RED,
    RESUMABLE_RUN,
    assert_resumes_after_sigkill,
    assert_same_checkpoint,
    checkpoint_weights,
    logged_losses,
    one_torch_thread,
    run_under_torchrun,
    write_colour_patches,
    write_config,
)

PROMPT = "a red square"


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("training")
    return {
        "model": DiffusersReferences(root / "sd15").folder,
        "data": write_colour_patches(root / "data"),
        "root": root,
    }


@pytest.fixture(scope="module")
def toy_run(folders: dict[str, Path]) -> TrainingResult:
    """40 steps on the red patch, attention and LoCon convolutions, an evaluation prompt at each checkpoint."""
    _, config = write_config(
        folders,
        "toy",
        lora={"rank": 8, "layers": "attention+conv"},
        training={"max_steps": 40, "batch_size": 2, "learning_rate": 1e-2, "checkpoint_every": 20, "seed": 1},
        evaluation={"prompts": [PROMPT], "steps": 2},
    )
    return train_lora(config)


def generate(sd: StableDiffusion_1) -> torch.Tensor:
    """Latents of a 10-step DDIM generation of PROMPT, seed 5, no guidance."""
    sd.solver, sd.show_progress = DDIM(num_inference_steps=10), False
    with torch.no_grad():
        embedding = sd.compute_clip_text_embedding(PROMPT)
        x = sd.init_latents(size=(16, 16), seed=5)
        for step in sd.steps:
            x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=1.0)
    return x


def test_the_loss_goes_down_and_generations_move_toward_the_colour_patch(toy_run: TrainingResult) -> None:
    losses = list(toy_run.losses.values())
    assert len(losses) == 40 and toy_run.step == 40
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    sd, manager = toy_run.model, LoraManager(toy_run.model)
    assert isinstance(sd, StableDiffusion_1)
    target = sd.lda.encode((torch.tensor(RED) / 127.5 - 1).view(1, 3, 1, 1).expand(1, 3, 16, 16))
    with_lora = generate(sd)
    manager.set_scale("lora", 0.0)
    without_lora = generate(sd)
    manager.set_scale("lora", 1.0)
    # The random autoencoder keeps little of the colour in pixels: compare the latents the generation ends on.
    distance_with, distance_without = (with_lora - target).norm().item(), (without_lora - target).norm().item()
    assert distance_with < 0.6 * distance_without, (distance_with, distance_without)


def test_the_base_model_is_frozen_and_untouched(toy_run: TrainingResult, folders: dict[str, Path]) -> None:
    sd = toy_run.model
    manager = LoraManager(sd)
    trained = {name for name, parameter in sd.named_parameters() if parameter.requires_grad}
    assert trained and all(".down." in name or ".up." in name for name in trained)
    weights = manager.state_dict("lora")
    manager.remove("lora")
    try:
        assert not any(parameter.requires_grad for parameter in sd.parameters())
        fresh = StableDiffusion_1.from_pretrained(folders["model"]).state_dict()
        after = sd.state_dict()
        assert after.keys() == fresh.keys()
        assert all(torch.equal(after[key], fresh[key]) for key in fresh)  # bit for bit
    finally:
        manager.add("lora", weights)


def test_a_run_writes_checkpoints_samples_a_log_and_every_export(
    toy_run: TrainingResult, folders: dict[str, Path]
) -> None:
    output = folders["root"] / "toy"
    assert (output / "checkpoints" / "latest").read_text().strip() == "step-000040"
    assert toy_run.checkpoint == output / "checkpoints" / "step-000040"
    for step in ("step-000020", "step-000040"):
        assert (output / "checkpoints" / step / "lora_weights.safetensors").is_file()
        assert (output / "samples" / step / "00.png").is_file()
    log = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == list(range(1, 41))
    assert [entry["loss"] for entry in log] == list(toy_run.losses.values())
    assert sorted(toy_run.exports) == ["diffusers", "kohya", "refiners"]
    assert {path.name for path in toy_run.exports.values()} == {
        "lora.safetensors",
        "lora.kohya.safetensors",
        "lora.diffusers.safetensors",
    }


def unet_output(unet: torch.nn.Module, embedding: torch.Tensor, diffusers: bool = False) -> torch.Tensor:
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([400])
    with torch.no_grad():
        if diffusers:
            return unet(x, timestep, encoder_hidden_states=embedding).sample
        unet.set_timestep(timestep)  # pyright: ignore[reportCallIssue]
        unet.set_clip_text_embedding(embedding)  # pyright: ignore[reportCallIssue]
        return unet(x)


def test_exports_load_in_refiners_and_in_diffusers_with_the_trained_outputs(
    toy_run: TrainingResult, folders: dict[str, Path]
) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # type: ignore[import-untyped]
    from transformers import CLIPTextModel  # type: ignore[import-untyped]

    embedding = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    trained = unet_output(toy_run.model.unet, embedding)
    base = StableDiffusion_1.from_pretrained(folders["model"])
    assert not torch.allclose(unet_output(base.unet, embedding), trained, atol=1e-3)  # the LoRA matters
    for format, path in toy_run.exports.items():  # noqa: A001
        LoraManager(base).add(format, path)
        assert torch.allclose(unet_output(base.unet, embedding), trained, atol=1e-5), format
        LoraManager(base).remove(format)
    for format in ("kohya", "diffusers"):  # noqa: A001
        model = folders["model"]
        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(model / "vae"),  # pyright: ignore[reportUnknownMemberType]
            text_encoder=CLIPTextModel.from_pretrained(model / "text_encoder"),  # pyright: ignore[reportUnknownMemberType]
            tokenizer=None,  # pyright: ignore[reportArgumentType]
            unet=UNet2DConditionModel.from_pretrained(model / "unet"),  # pyright: ignore[reportUnknownMemberType]
            scheduler=DDIMScheduler(),  # pyright: ignore[reportArgumentType]
            safety_checker=None,  # pyright: ignore[reportArgumentType]
            feature_extractor=None,  # pyright: ignore[reportArgumentType]
            requires_safety_checker=False,
        )
        pipeline.load_lora_weights(str(toy_run.exports[format]))  # pyright: ignore[reportUnknownMemberType]
        reference = unet_output(pipeline.unet, embedding, diffusers=True)  # pyright: ignore[reportUnknownMemberType, reportArgumentType]
        scale = trained.abs().max().item()
        assert (reference - trained).abs().max().item() <= 1e-4 * scale, format


@pytest.fixture(scope="module")
def straight_run(folders: dict[str, Path]) -> TrainingResult:
    """4 steps without interruption: the reference of the resumed and the multi-process runs."""
    _, config = write_config(folders, "straight", **RESUMABLE_RUN)  # pyright: ignore[reportArgumentType]
    return train_lora(config)


def test_a_run_killed_while_writing_a_checkpoint_resumes_to_the_same_losses_and_weights(
    straight_run: TrainingResult,
    folders: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, config = write_config(folders, "resumed", **RESUMABLE_RUN)  # pyright: ignore[reportArgumentType]
    write = trainer_module._Run._write_checkpoint  # pyright: ignore[reportPrivateUsage]

    def killed_at_step_4(run: trainer_module._Run, folder: Path) -> None:  # pyright: ignore[reportPrivateUsage]
        if run.step < 4:
            return write(run, folder)
        (folder / trainer_module.LORA_WEIGHTS).write_bytes(b"half a file")
        raise KeyboardInterrupt  # as if killed in the middle of the write

    monkeypatch.setattr(trainer_module._Run, "_write_checkpoint", killed_at_step_4)  # pyright: ignore[reportPrivateUsage]
    with pytest.raises(KeyboardInterrupt):
        train_lora(config)
    monkeypatch.undo()
    checkpoints = config.training.output_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000002"
    assert sorted(path.name for path in checkpoints.iterdir()) == ["latest", "step-000002"]

    assert main(["train", "lora", str(path)]) == 2  # refuses to start over a run with checkpoints
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "lora", str(path), "--resume"]) == 0
    assert logged_losses(config.training.output_dir) == list(straight_run.losses.values())  # exactly
    assert_same_checkpoint(folders["root"] / "straight", config.training.output_dir, 4)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_a_process_killed_with_sigkill_during_a_checkpoint_write_resumes_to_the_same_losses_and_weights(
    straight_run: TrainingResult, folders: dict[str, Path]
) -> None:
    path, config = write_config(folders, "sigkilled", **RESUMABLE_RUN)  # pyright: ignore[reportArgumentType]
    losses = list(straight_run.losses.values())
    assert_resumes_after_sigkill(path, config.training.output_dir, folders["root"] / "straight", losses)


def test_two_processes_under_torchrun_train_the_weights_of_one_process_with_the_same_global_batch(
    straight_run: TrainingResult, folders: dict[str, Path]
) -> None:
    per_process = {**RESUMABLE_RUN, "training": {**RESUMABLE_RUN["training"], "batch_size": 1}}
    path, config = write_config(folders, "ddp", **per_process)  # pyright: ignore[reportArgumentType]
    losses = list(straight_run.losses.values())
    expected, distributed = run_under_torchrun(path, config.training.output_dir, folders["root"] / "straight", losses)
    for key in expected:
        assert torch.allclose(distributed[key], expected[key], atol=1e-5, rtol=1e-5), key


def copy_run(folders: dict[str, Path], source: str, name: str, **sections: object) -> tuple[Path, TrainingConfig]:
    """A copy of run `source`'s checkpoints and log (not its exports), configured as `name` with RESUMABLE_RUN's
    keys."""
    path, config = write_config(folders, name, **{**RESUMABLE_RUN, **sections})  # pyright: ignore[reportArgumentType]
    shutil.copytree(folders["root"] / source, config.training.output_dir)
    for export in config.training.output_dir.glob("*.safetensors"):
        export.unlink()
    return path, config


def edit_weights(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        tensors = load_file(folder / trainer_module.LORA_WEIGHTS)
        edit(tensors)
        save_file(tensors, folder / trainer_module.LORA_WEIGHTS)

    return damage


def edit_state(edit: Callable[[dict[str, Any]], object]) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        state = torch.load(folder / trainer_module.TRAINING_STATE, weights_only=True)
        torch.save(edit(state), folder / trainer_module.TRAINING_STATE)

    return damage


def cut(name: str, keep: float) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: int(len(data) * keep)])

    return damage


def write_text(name: str, text: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / name).write_text(text, encoding="utf-8")

    return damage


def first_key(tensors: dict[str, torch.Tensor]) -> str:
    return sorted(tensors)[0]


def drop_first(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[first_key(tensors)]


def nan_first(tensors: dict[str, torch.Tensor]) -> None:
    tensors[first_key(tensors)].fill_(float("nan"))


def moment(state: dict[str, Any], value: torch.Tensor) -> dict[str, Any]:
    state["optimizer"]["state"][0]["exp_avg"] = value
    return state


def param_group(state: dict[str, Any], **values: object) -> dict[str, Any]:
    state["optimizer"]["param_groups"][0].update(values)
    return state


WEIGHTS, STATE = "lora_weights\\.safetensors", "training_state\\.pt"
DAMAGES: dict[str, tuple[Callable[[Path], None], str]] = {
    "weights truncated": (cut(trainer_module.LORA_WEIGHTS, 0.5), f"cannot read .*step-000004/{WEIGHTS}"),
    "weights empty": (cut(trainer_module.LORA_WEIGHTS, 0.0), f"cannot read .*step-000004/{WEIGHTS}"),
    "weights missing": (lambda f: (f / trainer_module.LORA_WEIGHTS).unlink(), f"step-000004 is incomplete: {WEIGHTS}"),
    "weights lack a key": (
        edit_weights(drop_first),
        f"{WEIGHTS} does not fit the configured LoRA .*1 weight\\(s\\) missing",
    ),
    "weights of another rank": (
        edit_weights(lambda t: t.update({k: torch.zeros(3, *v.shape[1:]) for k, v in t.items() if ".down." in k})),
        f"{WEIGHTS}: '.*down.*' has shape \\(3, .*\\), the configured LoRA \\(lora.rank = 2\\) needs \\(2, ",
    ),
    "weights NaN": (
        edit_weights(nan_first),
        f"{WEIGHTS}: '.*' holds non-finite values",
    ),
    "weights integers": (
        edit_weights(lambda t: t.update({first_key(t): t[first_key(t)].long()})),
        f"{WEIGHTS}: '.*' is torch.int64, expected torch.float32",
    ),
    "state truncated": (cut(trainer_module.TRAINING_STATE, 0.7), f"cannot read .*step-000004/{STATE}"),
    "state empty": (cut(trainer_module.TRAINING_STATE, 0.0), f"cannot read .*step-000004/{STATE}"),
    "state lacks a key": (
        edit_state(lambda s: {k: v for k, v in s.items() if k != "optimizer"}),
        f"{STATE} is incomplete: it lacks 'optimizer'",
    ),
    "state is a list": (edit_state(lambda s: [1, 2]), f"{STATE} is not a training state"),
    "state of another step": (edit_state(lambda s: s | {"step": 3}), f"{STATE}: 'step' is 3, but .* step 4"),
    "state with an infinite moment": (
        edit_state(lambda s: moment(s, torch.full_like(s["optimizer"]["state"][0]["exp_avg"], float("inf")))),
        f"{STATE}: 'optimizer.state.0.exp_avg' holds non-finite values",
    ),
    "state with a moment of another shape": (
        edit_state(lambda s: moment(s, torch.zeros(3))),
        f"{STATE}: optimizer 'exp_avg' of parameter 0 has shape \\(3,\\)",
    ),
    "state of another schedule": (
        edit_state(lambda s: s | {"scheduler": s["scheduler"] | {"last_epoch": 7}}),
        f"{STATE}: 'scheduler' is not the learning-rate schedule of step 4",
    ),
    "state with a learning rate that is text": (
        edit_state(lambda s: param_group(s, lr="fast")),
        f"{STATE}: 'optimizer' holds no valid AdamW parameter groups",
    ),
    "state is JSON text": (write_text(trainer_module.TRAINING_STATE, '{"step": 4}'), f"cannot read .*{STATE}"),
    "state with a NaN learning rate": (
        edit_state(lambda s: s | {"scheduler": s["scheduler"] | {"base_lrs": [float("nan")]}}),
        f"{STATE}: 'scheduler.base_lrs.0' holds non-finite values",
    ),
    "latest is a huge file": (
        write_text("../latest", "step-000004" * 1_000_000),
        "checkpoints/latest names checkpoint 'step-000004step-000004.*', which is not a checkpoint folder",
    ),
    "latest missing": (
        lambda f: (f.parent / "latest").unlink(),
        "checkpoints/latest is missing, but .*checkpoints holds checkpoints \\(step-000004 the newest\\)",
    ),
    "latest names no checkpoint": (
        write_text("../latest", "../../etc\n"),
        "checkpoints/latest names checkpoint '../../etc', which is not a checkpoint folder",
    ),
}


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


NEEDS_THE_MODEL = {
    "weights lack a key",
    "weights of another rank",
    "weights integers",
    "state with a moment of another shape",
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_resuming_from_a_damaged_checkpoint_is_refused_naming_the_file(
    straight_run: TrainingResult,
    folders: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    damage: str,
) -> None:
    path, config = copy_run(folders, "straight", f"damaged-{damage.replace(' ', '-')}")
    checkpoints = config.training.output_dir / "checkpoints"
    damage_checkpoint, message = DAMAGES[damage]
    damage_checkpoint(checkpoints / "step-000004")
    before = snapshot(config.training.output_dir)
    loads: list[object] = []

    class CountingLoads(StableDiffusion_1):
        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> StableDiffusion_1:
            loads.append(args)
            return StableDiffusion_1.from_pretrained(*args, **kwargs)

    monkeypatch.setattr(models_module, "StableDiffusion_1", CountingLoads)
    with pytest.raises(CheckpointError, match=message) as error:
        train_lora(config, resume=True)
    assert "--resume --fallback" in str(error.value)  # step-000002 is still there
    assert main(["train", "lora", str(path), "--resume"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("refiners train lora: error: ") and re.search(message, line), line
    assert snapshot(config.training.output_dir) == before  # the run's files are left as they were
    # Only what depends on the LoRA's shapes waits for the model: anything else is found before it loads.
    assert len(loads) == (2 if damage in NEEDS_THE_MODEL else 0), loads


@pytest.mark.parametrize(
    ("damage", "resumed_from"),
    [
        ("weights truncated", "step-000002"),
        ("state with an infinite moment", "step-000002"),
        ("latest names no checkpoint", "step-000004"),  # the newest folder is complete: only the pointer is damaged
        ("latest missing", "step-000004"),
    ],
)
def test_resume_with_fallback_goes_on_from_the_newest_checkpoint_that_loads(
    straight_run: TrainingResult,
    folders: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
    damage: str,
    resumed_from: str,
) -> None:
    path, config = copy_run(folders, "straight", f"fallback-{damage.replace(' ', '-')}")
    checkpoints = config.training.output_dir / "checkpoints"
    damage_checkpoint, message = DAMAGES[damage]
    damage_checkpoint(checkpoints / "step-000004")
    with caplog.at_level(logging.WARNING, logger="refiners_training.trainer"):
        assert main(["train", "lora", str(path), "--resume", "--fallback"]) == 0
    assert re.search(message, caplog.text) and f"resuming from checkpoint {resumed_from}" in caplog.text
    assert logged_losses(config.training.output_dir) == list(straight_run.losses.values())
    expected = checkpoint_weights(folders["root"] / "straight", 4)
    resumed = checkpoint_weights(config.training.output_dir, 4)
    assert all(torch.equal(resumed[key], expected[key]) for key in expected)  # step 4 written anew, whole
    assert (checkpoints / "latest").read_text().strip() == "step-000004"


def test_damaged_log_lines_are_dropped_when_a_run_resumes(
    straight_run: TrainingResult, folders: dict[str, Path]
) -> None:
    path, config = copy_run(folders, "straight", "damaged-log")
    log = config.training.output_dir / "log.jsonl"
    damaged = [b'{"step": "x"}', b'{"step": NaN}', b"[" * 100_000, b'{"step": 1, "loss": 0.\xff', b'{"ste', b"[]"]
    log.write_bytes(b"\n".join([*log.read_bytes().splitlines(), *damaged]) + b"\n")
    assert main(["train", "lora", str(path), "--resume"]) == 0  # at max_steps already: exports only
    assert logged_losses(config.training.output_dir) == list(straight_run.losses.values())


def test_resume_with_fallback_and_no_checkpoint_that_loads_names_each_one(
    straight_run: TrainingResult, folders: dict[str, Path]
) -> None:
    _, config = copy_run(folders, "straight", "all-damaged")
    checkpoints = config.training.output_dir / "checkpoints"
    DAMAGES["weights NaN"][0](checkpoints / "step-000004")
    DAMAGES["state empty"][0](checkpoints / "step-000002")
    with pytest.raises(CheckpointError, match=r"no checkpoint of .* loads: step-000004: .*non-finite.*; step-000002"):
        train_lora(config, resume=True, fallback=True)


@pytest.mark.parametrize(
    ("cause", "message", "kept"),
    [
        ("a NaN loss at step 3", r"the loss of step 3 is nan: .*the latest checkpoint, step-000002, is kept", 2),
        ("an infinite loss at step 1", r"the loss of step 1 is inf: .*\(no checkpoint was written\)", 0),
        ("NaN gradients at step 2", r"the gradients of step 2 are not finite .*checkpoint, step-000001, is kept", 1),
        ("an infinite weight", r"the LoRA weight '.*' is not finite at step 1: .*without writing", 0),
    ],
)
def test_a_non_finite_loss_or_weight_stops_the_run_and_never_reaches_a_file(
    folders: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    cause: str,
    message: str,
    kept: int,
) -> None:
    training = {**RESUMABLE_RUN["training"], "checkpoint_every": 1}
    path, config = write_config(folders, f"nan-{cause.replace(' ', '-')}", **{**RESUMABLE_RUN, "training": training})  # pyright: ignore[reportArgumentType]
    mse_loss, calls = trainer_module.F.mse_loss, [0]
    first_bad_call = {"a NaN loss at step 3": 5, "NaN gradients at step 2": 3}.get(cause, 1)  # 2 passes per step

    def diverging(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        loss = mse_loss(prediction, target)
        if calls[0] < first_bad_call:
            return loss
        if cause == "NaN gradients at step 2":  # a finite loss whose gradient is NaN (0 times the sqrt of -1)
            never = torch.where(prediction > 1e30, (-1 - prediction.abs()).sqrt(), torch.zeros_like(prediction))
            return loss + never.sum()
        return loss * (float("nan") if cause == "a NaN loss at step 3" else float("inf"))

    optimizer_step = trainer_module._Run._optimizer_step  # pyright: ignore[reportPrivateUsage]

    def overflowing(run: trainer_module._Run) -> float:  # pyright: ignore[reportPrivateUsage]
        loss = optimizer_step(run)  # as an optimizer step that overflows would leave the weights
        next(iter(run.parameters.values())).data.fill_(float("inf"))
        return loss

    if cause == "an infinite weight":
        monkeypatch.setattr(trainer_module._Run, "_optimizer_step", overflowing)  # pyright: ignore[reportPrivateUsage]
    else:
        monkeypatch.setattr(trainer_module.F, "mse_loss", diverging)
    assert main(["train", "lora", str(path)]) == 2
    error = capsys.readouterr().err
    last_line = error.strip().splitlines()[-1]  # after the progress bar
    assert last_line.startswith("refiners train lora: error: ") and re.search(message, last_line), error
    output = config.training.output_dir
    checkpoints = (
        sorted(p.name for p in (output / "checkpoints").iterdir()) if (output / "checkpoints").exists() else []
    )
    assert checkpoints == (["latest", *(f"step-{step:06d}" for step in range(1, kept + 1))] if kept else [])
    assert not list(output.glob("*.safetensors"))  # no export
    if cause != "an infinite weight":  # whose step logged its (finite) loss
        assert len(logged_losses(output)) == kept  # the failing step is not logged
    if kept:
        assert (output / "checkpoints" / "latest").read_text().strip() == f"step-{kept:06d}"
        weights = load_file(output / "checkpoints" / f"step-{kept:06d}" / "lora_weights.safetensors")
        assert all(bool(torch.isfinite(tensor).all()) for tensor in weights.values())
        assert main(["train", "lora", str(path), "--resume"]) == 2  # resumes, then stops at the same step
        assert len(logged_losses(output)) == kept


def test_captions_and_evaluation_prompts_are_tokenized_once_per_run(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    texts: list[object] = []
    tokenize = CLIPTokenizer.forward

    def counting(tokenizer: CLIPTokenizer, text: str | list[str]) -> torch.Tensor:
        texts.append(text)
        return tokenize(tokenizer, text)

    monkeypatch.setattr(CLIPTokenizer, "forward", counting)
    training = {**RESUMABLE_RUN["training"], "max_steps": 3, "checkpoint_every": 1, "lr_warmup_steps": 0}
    prompts = ["a red square", "a blue circle"]
    _, config = write_config(
        folders,
        "tokenized-once",
        **{**RESUMABLE_RUN, "training": training, "evaluation": {"prompts": prompts, "steps": 1}},  # pyright: ignore[reportArgumentType]
    )
    train_lora(config)
    assert [text for text in texts if isinstance(text, list)] == [["", prompt] for prompt in prompts]
    assert texts.count("a red square") == 3  # one per image, however many steps and checkpoints
    assert (config.training.output_dir / "samples" / "step-000003" / "01.png").is_file()
