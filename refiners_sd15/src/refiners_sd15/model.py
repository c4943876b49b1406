"""`StableDiffusion_1`: the UNet, the autoencoder and the CLIP text encoder of Stable Diffusion 1.5, and the
denoising loop that drives them with a solver."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from refiners_core.layer_blocks import LayerBlock
from refiners_core.module_names import DIFFUSERS, prefixed
from refiners_core.weights import WeightsError, load_tensors, resolve_path
from refiners_sd15.architecture import single_file_shapes
from refiners_sd15.autoencoder import SD1Autoencoder
from refiners_sd15.clip import TEXT_ENCODER_FORMAT, CLIPTextEncoderL
from refiners_sd15.latent_diffusion import LatentDiffusionModel, guidance_prompts
from refiners_sd15.loading import (
    PathOrRepoId,
    load_located,
    load_single_file_component,
    locate_component,
    read_component_config,
    read_json_object,
    read_own_config,
    read_scheduler_config,
    read_single_file_config,
    scheduler_prediction_type,
)
from refiners_sd15.solvers import Solver
from refiners_sd15.unet import UNET_FORMAT, SD1UNet

OWN_INDEX = "refiners_sd15.json"
OWN_FILES = {"unet": "unet.safetensors", "lda": "lda.safetensors", "clip_text_encoder": "clip_text_encoder.safetensors"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


def check_not_sdxl(path_or_repo_id: PathOrRepoId, *, revision: str | None = None) -> None:
    """Raise ValueError naming `model_index.json` when a diffusers folder or hub id holds an SDXL pipeline (its
    components would otherwise fail one by one, on the UNet's added embedding). A folder without one passes."""
    try:
        path = resolve_path(path_or_repo_id, "model_index.json", revision=revision)
    except FileNotFoundError:
        return
    try:
        pipeline: object = json.loads(path.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as error:
        raise WeightsError(f"cannot read {path} as a JSON object: {error}") from error
    if isinstance(pipeline, str) and pipeline.startswith("StableDiffusionXL"):
        raise ValueError(
            f"{path}: _class_name is {pipeline!r}, a Stable Diffusion XL model: load it with "
            "refiners_sdxl.StableDiffusion_XL (the refiners-sdxl package), not StableDiffusion_1"
        )


def check_text_width(path_or_repo_id: PathOrRepoId, *, revision: str | None = None) -> None:
    """Raise ValueError naming both components and both widths when the UNet of a diffusers folder or hub id does not
    attend to text as wide as its text encoder gives (e.g. an SD2 UNet, `cross_attention_dim` 1024, next to SD1.5's
    768-wide CLIP-L), which would otherwise fail only at the first generation. Components without a config.json
    are not checked here (their defaults are SD1.5's)."""
    try:
        unet = read_component_config(UNET_FORMAT, path_or_repo_id, revision=revision)
        text_encoder = read_component_config(TEXT_ENCODER_FORMAT, path_or_repo_id, revision=revision)
    except FileNotFoundError:
        return
    if unet.cross_attention_dim != text_encoder.embedding_dim:
        raise ValueError(
            f"{os.fspath(path_or_repo_id)}: unet attends to {unet.cross_attention_dim}-wide text "
            f"(unet/config.json cross_attention_dim) but text_encoder gives {text_encoder.embedding_dim}-wide "
            "embeddings (text_encoder/config.json hidden_size): these components do not belong together"
        )


class StableDiffusion_1(LatentDiffusionModel[SD1UNet]):
    """Stable Diffusion 1.5: `unet`, `lda` (the autoencoder) and `clip_text_encoder`, driven by `solver`.

    `StableDiffusion_1()` builds the published architecture with random weights; `from_pretrained` reads a
    diffusers folder or hub id, our own `save_pretrained` folder, or an original single-file checkpoint.

        sd.solver = DPMSolver(num_inference_steps=30)  # the default
        embedding = sd.compute_clip_text_embedding("a cute cat", negative_text="blurry")
        with torch.no_grad():
            x = sd.init_latents(size=(512, 512), seed=2)
            for step in sd.steps:
                x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
        image = sd.lda.latents_to_image(x)

    Image-to-image: a solver with `first_inference_step > 0` and `init_latents(..., init_image=image)`.
    `sd.steps` shows a tqdm progress bar unless `sd.show_progress` is False.
    """

    def __init__(
        self,
        unet: SD1UNet | None = None,
        lda: SD1Autoencoder | None = None,
        clip_text_encoder: CLIPTextEncoderL | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | None = None,
        solver_defaults: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        super().__init__(
            unet if unet is not None else SD1UNet(device=device, dtype=dtype),
            lda if lda is not None else SD1Autoencoder(device=device, dtype=dtype),
            solver=solver,
            solver_defaults=solver_defaults,
            show_progress=show_progress,
        )
        self.clip_text_encoder = (
            clip_text_encoder if clip_text_encoder is not None else CLIPTextEncoderL(device=device, dtype=dtype)
        )

    @torch.no_grad()
    def compute_clip_text_embedding(self, text: str | list[str], negative_text: str | list[str] = "") -> torch.Tensor:
        """Text embeddings for classifier-free guidance: `(2, 77, 768)` for one prompt, the negative one first.

        Raises TypeError if a prompt is not a string, ValueError if the counts of prompts and negative prompts
        differ or there is no prompt.
        """
        return self.clip_text_encoder(guidance_prompts(text, negative_text))

    def forward(
        self, x: torch.Tensor, step: int, *, clip_text_embedding: torch.Tensor, condition_scale: float = 7.5
    ) -> torch.Tensor:
        """One denoising step: the solver's next latents after the UNet's noise prediction at `step`.

        Classifier-free guidance: the UNet runs once on the batch `[x, x]` with `clip_text_embedding` (negative
        embeddings first, as `compute_clip_text_embedding` gives them) and the two predictions are combined as
        `negative + condition_scale * (positive - negative)`. Raises ValueError if `step` is not one of the solver's
        steps (an index of its `timesteps`: 0 to `num_inference_steps - 1`, more for a solver that evaluates the
        model twice per step; no negative indexing) or `condition_scale` is not a finite number.
        """
        steps = len(self.solver.timesteps)  # a solver evaluating the model twice per step has more (Heun)
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < steps:  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"step must be an integer from 0 to {steps - 1} (the solver's steps), got {step!r}")
        timestep = self.solver.timesteps[step]
        unet_input = self.solver.scale_model_input(x, step)
        predicted_noise = self.compute_noise(unet_input, timestep, clip_text_embedding, condition_scale)
        return self.solver.step(x, predicted_noise, step)

    def compute_noise(
        self, x: torch.Tensor, timestep: torch.Tensor, clip_text_embedding: torch.Tensor, condition_scale: float
    ) -> torch.Tensor:
        """The noise predicted in the (already scaled) latents `x` at `timestep`, with classifier-free guidance.

        Raises ValueError if `condition_scale` is NaN or infinite (it would turn every latent into NaN).
        """
        if clip_text_embedding.shape[0] != 2 * x.shape[0]:
            raise ValueError(
                f"clip_text_embedding must hold a negative and a positive embedding per latent: {2 * x.shape[0]} for "
                f"{x.shape[0]} latents, got {clip_text_embedding.shape[0]}"
            )
        self.unet.set_timestep(timestep)
        self.unet.set_clip_text_embedding(clip_text_embedding)
        return self.guided_noise(x, condition_scale)

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        """diffusers or kohya module name -> our layer path (the `ForeignModuleNames` protocol, for LoRA files).

        `DIFFUSERS`: `unet.` + the UNet's names (or the UNet's names alone, as in diffusers' older LoRA files) and
        `text_encoder.` + the text encoder's; `KOHYA`: the components' `lora_unet_*` and `lora_te_*` names.
        """
        unet = self.unet.foreign_module_names(convention)
        text_encoder = self.clip_text_encoder.foreign_module_names(convention)
        if convention == DIFFUSERS:
            return (
                prefixed(unet, "unet.", "unet.")
                | prefixed(unet, "", "unet.")
                | prefixed(text_encoder, "text_encoder.", "clip_text_encoder.")
            )
        return prefixed(unet, "", "unet.") | prefixed(text_encoder, "", "clip_text_encoder.")

    def layer_blocks(self) -> dict[str, LayerBlock]:
        """Layer path -> its block, for per-block LoRA weights (the `LayerBlocks` protocol): the UNet's (component
        `unet`) and the text encoder's (component `text_encoder`, one block)."""
        blocks = {f"unet.{path}": block for path, block in self.unet.layer_blocks().items()}
        for path in self.clip_text_encoder.foreign_module_names(DIFFUSERS).values():
            blocks[f"clip_text_encoder.{path}"] = LayerBlock("text_encoder")
        return blocks

    def foreign_pointwise_convolutions(self, convention: str) -> set[str]:
        """The foreign names of the UNet's `proj_in` / `proj_out`: 1x1 convolutions in SD1, our Linears (the
        `ForeignPointwiseConvolutions` protocol)."""
        return {name for name in self.foreign_module_names(convention) if name.endswith(("proj_in", "proj_out"))}

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: PathOrRepoId,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        mmap: bool = False,
    ) -> StableDiffusion_1:
        """Load from a diffusers folder or hub id (`unet/`, `vae/`, `text_encoder/`), a folder written by
        `save_pretrained`, or an original single-file checkpoint (`.safetensors`/`.ckpt`).

        `variant` picks e.g. the `fp16` weight files of a diffusers repository. The weights are copied into memory
        (whatever happens to the files afterwards does not reach the model), or with `mmap=True` memory-mapped: a
        faster load, but the files must stay unchanged while the model lives (truncating one kills the process
        with SIGBUS; see `refiners_core.weights`). Either way, no weight is copied twice. `tokenizer/` and `scheduler/`
        folders are not needed: the tokenizer ships with this package and solvers are ours; a `scheduler/` whose
        `prediction_type` is not "epsilon" (a v-prediction fine-tune) makes it a solver default (`solver_defaults`),
        so every solver set on the model predicts the same way. Raises FileNotFoundError naming a missing component,
        WeightsError naming the file, key and layer at fault, and ValueError naming a scheduler config whose
        `prediction_type` our solvers do not read.
        """
        local = Path(path_or_repo_id).expanduser()
        if local.is_file():
            return cls.from_single_file(local, device=device, dtype=dtype, mmap=mmap)
        if (local / OWN_INDEX).is_file():
            return cls._from_own_folder(local, device=device, dtype=dtype, mmap=mmap)
        check_not_sdxl(path_or_repo_id, revision=revision)
        located = [
            locate_component(component.component_format, path_or_repo_id, variant=variant, revision=revision)
            for component in (SD1UNet, SD1Autoencoder, CLIPTextEncoderL)
        ]  # every config and weight file checked before any weights are read
        check_text_width(path_or_repo_id, revision=revision)
        scheduler = read_scheduler_config(path_or_repo_id, revision=revision)
        prediction_type = "epsilon" if scheduler is None else scheduler_prediction_type(*scheduler)
        unet, lda, clip_text_encoder = located
        return cls(
            unet=load_located(SD1UNet, unet, device=device, dtype=dtype, mmap=mmap),
            lda=load_located(SD1Autoencoder, lda, device=device, dtype=dtype, mmap=mmap),
            clip_text_encoder=load_located(CLIPTextEncoderL, clip_text_encoder, device=device, dtype=dtype, mmap=mmap),
            solver_defaults=_prediction_defaults(prediction_type),
        )

    @classmethod
    def architecture(
        cls,
        source: PathOrRepoId | None = None,
        *,
        device: torch.device | str | None = "meta",
        dtype: torch.dtype | None = None,
    ) -> StableDiffusion_1:
        """The model `from_pretrained(source)` builds, with no weight read (on the meta device by default): the
        published architecture for `source` None, else the UNet and text encoder of the configs of a local diffusers
        folder (`unet/config.json`, `text_encoder/config.json`), of a folder written by `save_pretrained` (the files'
        metadata), or of a single `.safetensors` checkpoint (the shapes in its header). The autoencoder, which adapters
        do not patch, is the published one. Raises what `from_pretrained` raises about configs, and ValueError naming
        a single file that is not safetensors (its shapes cannot be read without loading it).
        """
        if source is None:
            return cls(device=device, dtype=dtype)
        local = Path(source).expanduser()
        if local.is_file():
            shapes = single_file_shapes(local)
            unet_config = read_single_file_config(SD1UNet.component_format, source=local, tensors=shapes)
            text_config = read_single_file_config(CLIPTextEncoderL.component_format, source=local, tensors=shapes)
        elif (local / OWN_INDEX).is_file():
            unet_config = read_own_config(SD1UNet.component_format, local / OWN_FILES["unet"])
            text_config = read_own_config(CLIPTextEncoderL.component_format, local / OWN_FILES["clip_text_encoder"])
        else:
            check_not_sdxl(source)
            check_text_width(source)
            unet_config = read_component_config(SD1UNet.component_format, source)
            text_config = read_component_config(CLIPTextEncoderL.component_format, source)
        return cls(
            unet=SD1UNet(unet_config, device=device, dtype=dtype),
            clip_text_encoder=CLIPTextEncoderL(text_config, device=device, dtype=dtype),
            device=device,
            dtype=dtype,
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mmap: bool = False,
    ) -> StableDiffusion_1:
        """Load an original SD1.5 checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
        `cond_stage_model.transformer.*` keys); other entries (EMA copies, noise schedule) are ignored. With
        `mmap=True` the weights are memory-mapped from the file (see `from_pretrained`)."""
        path = Path(path)
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise WeightsError(f"{path}: not a checkpoint file (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        tensors = load_tensors(path, mmap=mmap)
        sdxl = next((key for key in tensors if key.startswith("conditioner.embedders.")), None)
        if sdxl is not None:
            raise ValueError(
                f"{path}: '{sdxl}' is an SDXL text encoder: load this checkpoint with refiners_sdxl.StableDiffusion_XL"
            )
        return cls(
            unet=load_single_file_component(
                SD1UNet, SD1UNet.component_format, source=path, tensors=tensors, device=device, dtype=dtype
            ),
            lda=load_single_file_component(
                SD1Autoencoder,
                SD1Autoencoder.component_format,
                source=path,
                tensors=tensors,
                device=device,
                dtype=dtype,
            ),
            clip_text_encoder=load_single_file_component(
                CLIPTextEncoderL,
                CLIPTextEncoderL.component_format,
                source=path,
                tensors=tensors,
                device=device,
                dtype=dtype,
            ),
        )

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write the three components in our own format (one safetensors file each) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save(folder / OWN_FILES["unet"])
        self.lda.save(folder / OWN_FILES["lda"])
        self.clip_text_encoder.save(folder / OWN_FILES["clip_text_encoder"])
        index = {"format": "refiners-sd15", "components": OWN_FILES, "solver_defaults": self.solver_defaults}
        (folder / OWN_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def _from_own_folder(
        cls, folder: Path, *, device: torch.device | str | None, dtype: torch.dtype | None, mmap: bool
    ) -> StableDiffusion_1:
        index_path = folder / OWN_INDEX
        solver_defaults = read_json_object(index_path).get("solver_defaults", {})  # none before prediction types
        if not isinstance(solver_defaults, dict):
            raise WeightsError(f"{index_path}: solver_defaults should be a JSON object, got {solver_defaults!r}")
        prediction_type = scheduler_prediction_type(index_path, solver_defaults)  # pyright: ignore[reportUnknownArgumentType]
        return cls(
            solver_defaults=_prediction_defaults(prediction_type),
            unet=SD1UNet.from_pretrained(folder / OWN_FILES["unet"], device=device, dtype=dtype, mmap=mmap),
            lda=SD1Autoencoder.from_pretrained(folder / OWN_FILES["lda"], device=device, dtype=dtype, mmap=mmap),
            clip_text_encoder=CLIPTextEncoderL.from_pretrained(
                folder / OWN_FILES["clip_text_encoder"], device=device, dtype=dtype, mmap=mmap
            ),
        )


def _prediction_defaults(prediction_type: str) -> dict[str, Any]:
    """SD1.5's solver defaults: none but a prediction type other than the solvers' own ("epsilon")."""
    return {} if prediction_type == "epsilon" else {"prediction_type": prediction_type}
