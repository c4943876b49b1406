"""`SDXLDenoisingModel`: what the SDXL models (base, inpainting, refiner) share: the defaults of their components
and solver, their text embeddings, their loading (a diffusers folder or hub id, an original single file, the folder
`save_pretrained` writes) and the denoising step, a solver driving the SDXL UNet with classifier-free guidance on
text, pooled text and time ids."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Generic, Self, TypeVar

import torch

import refiners_core.fluxion as fl
from refiners_core.layer_blocks import LayerBlock
from refiners_core.module_names import DIFFUSERS
from refiners_core.weights import load_tensors
from refiners_sd15 import SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderG, CLIPTextEncoderL, CLIPTokenizer
from refiners_sd15.latent_diffusion import LatentDiffusionModel, guidance_prompts
from refiners_sd15.loading import PathOrRepoId, PretrainedComponent
from refiners_sd15.solvers import Solver
from refiners_sd15.unet import UNetConfig
from refiners_sdxl.config import SDXL_AUTOENCODER
from refiners_sdxl.folder import SCHEDULER_DEFAULTS
from refiners_sdxl.module_names import sdxl_foreign_module_names
from refiners_sdxl.own_format import (
    check_own_index,
    component_file,
    read_own_solver_defaults,
    write_own_folder,
)
from refiners_sdxl.unet import SDXLUNet

TTextEncoder = TypeVar("TTextEncoder", bound=fl.Module)


class SDXLDenoisingModel(LatentDiffusionModel[SDXLUNet], Generic[TTextEncoder]):
    """An SDXL UNet denoising latents step by step with `solver`, its autoencoder `lda` and its text encoder
    `clip_text_encoder` (`TTextEncoder`): `forward` is one step with classifier-free guidance.

    `StableDiffusion_XL` (and its inpainting model) and `StableDiffusion_XL_Refiner` give what differs between them:
    `default_unet`, `own_index` and the class methods on their text encoders (`_default_text_encoder`,
    `_check_components`, `_read_folder`, `_load_text_encoder`, `_load_single_file`, `_own_text_encoders`,
    `_load_own_text_encoder`), and their time ids; `unet_input` is where a model adds its own conditions to the
    latents (the inpainting model's mask).

    Components not given are built with random weights: `SDXLUNet(default_unet)`, the SDXL autoencoder, the model's
    text encoder; `solver_defaults` default to SDXL's published scheduler settings (`SCHEDULER_DEFAULTS`), which a
    solver set on the model takes for the settings it was not given; `solver` to `DPMSolver(num_inference_steps=30)`.
    Raises ValueError, naming the components and their widths, when they do not fit each other.
    """

    default_unet: ClassVar[UNetConfig]
    """The UNet built when none is given: the published architecture."""
    own_index: ClassVar[str]
    """The index file `save_pretrained` writes and `from_pretrained` reads back (see `refiners_sdxl.own_format`)."""

    def __init__(
        self,
        unet: SDXLUNet | None = None,
        lda: SD1Autoencoder | None = None,
        clip_text_encoder: TTextEncoder | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | None = None,
        solver_defaults: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        unet = unet if unet is not None else SDXLUNet(self.default_unet, device=device, dtype=dtype)
        if clip_text_encoder is None:
            clip_text_encoder = self._default_text_encoder(device=device, dtype=dtype)
        self._check_components(unet.config, clip_text_encoder)
        super().__init__(
            unet,
            lda if lda is not None else SD1Autoencoder(SDXL_AUTOENCODER, device=device, dtype=dtype),
            solver=solver,
            solver_defaults=SCHEDULER_DEFAULTS if solver_defaults is None else solver_defaults,
            show_progress=show_progress,
        )
        self.clip_text_encoder: TTextEncoder = clip_text_encoder

    @torch.no_grad()
    def compute_clip_text_embedding(
        self, text: str | list[str], negative_text: str | list[str] = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and pooled text embeddings for classifier-free guidance, the negative ones first: for one prompt
        `(2, 77, 2048)` and `(2, 1280)` with the base model's CLIP-L and CLIP-G, `(2, 77, 1280)` and `(2, 1280)` with
        the refiner's CLIP-G (`(2N, ...)` for N prompts). Raises TypeError if a prompt is not a string, ValueError if
        there is no prompt or the counts of prompts and negative prompts differ (refiners-sd15's `guidance_prompts`)."""
        return self.clip_text_encoder(guidance_prompts(text, negative_text))

    def foreign_module_names(self, convention: str) -> dict[str, str]:
        """diffusers or kohya module name -> our layer path (the `ForeignModuleNames` protocol, for LoRA files).

        `DIFFUSERS`: `unet.` + the UNet's names (or the UNet's names alone), `text_encoder.` + CLIP-L's and
        `text_encoder_2.` + CLIP-G's; `KOHYA`: `lora_unet_*` (diffusers or original `input_blocks` paths),
        `lora_te1_*` (CLIP-L) and `lora_te2_*` (CLIP-G). See `refiners_sdxl.module_names`.
        """
        encoders: dict[str, tuple[str, CLIPTextEncoderL]] = {}
        for component, encoder in self.foreign_text_encoders():
            inner = encoder.get_path(top=self.clip_text_encoder)
            encoders[component] = ("clip_text_encoder" + (f".{inner}" if inner else ""), encoder)
        return sdxl_foreign_module_names(self.unet, encoders, convention)

    def foreign_pointwise_convolutions(self, convention: str) -> set[str]:
        """The foreign names of the UNet's `proj_in` / `proj_out` when they are 1x1 convolutions there (a config
        without `use_linear_projection`; SDXL's published UNets have linear ones): the
        `ForeignPointwiseConvolutions` protocol."""
        if self.unet.config.use_linear_projection:
            return set()
        return {name for name in self.foreign_module_names(convention) if name.endswith(("proj_in", "proj_out"))}

    def layer_blocks(self) -> dict[str, LayerBlock]:
        """Layer path -> its block, for per-block LoRA weights (the `LayerBlocks` protocol): the UNet's (component
        `unet`) and each text encoder's (component `text_encoder` for CLIP-L, `text_encoder_2` for CLIP-G)."""
        blocks = {f"unet.{path}": block for path, block in self.unet.layer_blocks().items()}
        for name, path in self.foreign_module_names(DIFFUSERS).items():
            component = name.partition(".")[0]
            if component in ("text_encoder", "text_encoder_2"):
                blocks[path] = LayerBlock(component)
        return blocks

    def foreign_text_encoders(self) -> list[tuple[str, CLIPTextEncoderL]]:
        """(diffusers component, encoder) of each text encoder: `text_encoder` (CLIP-L), `text_encoder_2` (CLIP-G)."""
        encoders = [layer for layer in self.clip_text_encoder.modules() if isinstance(layer, CLIPTextEncoderL)]
        return [("text_encoder_2" if isinstance(e, CLIPTextEncoderG) else "text_encoder", e) for e in encoders]

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
    ) -> Self:
        """Load from a diffusers folder or hub id (`unet/`, `vae/`, the text encoders' folders, and `scheduler/` for
        the solver's settings; the tokenizers ship with refiners-sd15), a folder written by `save_pretrained`, or an
        original single-file checkpoint (`from_single_file`).

        Configs are read and checked before any weight; no weight is copied twice, and every parameter lands on
        `device` with `dtype`. By default the weights are copied into memory: whatever happens to the files
        afterwards does not reach the model. With `mmap=True` they are memory-mapped (views of the files, where
        `dtype` is the files' on the CPU): a faster load, but the files must stay unchanged while the model lives
        (truncating one kills the process with SIGBUS; see `refiners_core.weights`).

        Raises ValueError naming `model_index.json`, the index file or the single file when they hold another model
        (SD1.5, an SDXL base given to the refiner or the reverse), or naming the components that do not fit each
        other; FileNotFoundError naming a missing component; WeightsError naming the file, key and layer at fault.
        """
        local = Path(path_or_repo_id).expanduser()
        if local.is_file():
            return cls.from_single_file(local, device=device, dtype=dtype, mmap=mmap)
        if (local / cls.own_index).is_file():
            return cls._from_own_folder(local, device=device, dtype=dtype, mmap=mmap)
        check_own_index(local, cls.own_index)
        solver_defaults, tokenizer_2 = cls._read_folder(path_or_repo_id, revision=revision)
        options: dict[str, Any] = {
            "device": device,
            "dtype": dtype,
            "variant": variant,
            "revision": revision,
            "mmap": mmap,
        }
        return cls(
            unet=SDXLUNet.from_pretrained(path_or_repo_id, **options),
            lda=SD1Autoencoder.from_pretrained(path_or_repo_id, **options),
            clip_text_encoder=cls._load_text_encoder(path_or_repo_id, options, tokenizer_2),
            solver_defaults=solver_defaults,
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mmap: bool = False,
    ) -> Self:
        """Load an original single-file checkpoint (see `refiners_sdxl.single_file`), each config read from the
        tensors' shapes (so a scaled-down checkpoint loads too; heads of 64 channels, 256 features per time id and
        the 0.13025 latent scale are SDXL's, as the weights do not store them) and checked before any weight is
        loaded. With `mmap=True` the weights are memory-mapped from the file (see `from_pretrained`). Raises
        ValueError naming the file and the key for another model's checkpoint (SD1.5, an SDXL base given to the
        refiner or the reverse), naming the file and the components that do not fit each other; WeightsError naming
        the file, key and layer for weights that do not fit."""
        path = Path(path)
        unet, lda, clip_text_encoder = cls._load_single_file(
            path, load_tensors(path, mmap=mmap), {"device": device, "dtype": dtype}
        )
        return cls(unet=unet, lda=lda, clip_text_encoder=clip_text_encoder)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write the components in our own format (one safetensors file each, its config in the metadata) and the
        index `own_index` (the files and the solver defaults) into `folder`, which `from_pretrained` reads back."""
        components: dict[str, PretrainedComponent] = {"unet": self.unet, "lda": self.lda}
        write_own_folder(Path(folder), self.own_index, components | self._own_text_encoders(), self.solver_defaults)

    @classmethod
    def _from_own_folder(
        cls, folder: Path, *, device: torch.device | str | None, dtype: torch.dtype | None, mmap: bool
    ) -> Self:
        solver_defaults = read_own_solver_defaults(folder, cls.own_index)
        options: dict[str, Any] = {"device": device, "dtype": dtype, "mmap": mmap}
        return cls(
            unet=SDXLUNet.from_pretrained(component_file(folder, "unet"), **options),
            lda=SD1Autoencoder.from_pretrained(component_file(folder, "lda"), **options),
            clip_text_encoder=cls._load_own_text_encoder(folder, options),
            solver_defaults=solver_defaults,
        )

    # What each model gives

    @classmethod
    def _default_text_encoder(cls, *, device: torch.device | str | None, dtype: torch.dtype | None) -> TTextEncoder:
        """The published text encoder(s) with random weights."""
        raise NotImplementedError

    @classmethod
    def _check_components(cls, unet: UNetConfig, clip_text_encoder: TTextEncoder) -> None:
        """Raise ValueError, naming the components and their widths, when they do not fit each other."""
        raise NotImplementedError

    @classmethod
    def _read_folder(
        cls, path_or_repo_id: PathOrRepoId, *, revision: str | None
    ) -> tuple[dict[str, Any], CLIPTokenizer | None]:
        """Check a diffusers folder's `model_index.json` and configs (`tokenizer_2/` included) without reading
        weights; its solver defaults and CLIP-G's tokenizer as `tokenizer_2/` describes it (None without one)."""
        raise NotImplementedError

    @classmethod
    def _load_text_encoder(
        cls, path_or_repo_id: PathOrRepoId, options: Mapping[str, Any], tokenizer_2: CLIPTokenizer | None
    ) -> TTextEncoder:
        """The text encoder(s) of a diffusers folder, loaded with `from_pretrained`'s `options` (device, dtype,
        variant, revision, mmap), CLIP-G with
        `tokenizer_2` when the folder describes one."""
        raise NotImplementedError

    @classmethod
    def _load_single_file(
        cls, path: Path, tensors: Mapping[str, torch.Tensor], options: Mapping[str, Any]
    ) -> tuple[SDXLUNet, SD1Autoencoder, TTextEncoder]:
        """The components of an original single file, checked before any weight is loaded (`options`: device, dtype)."""
        raise NotImplementedError

    def _own_text_encoders(self) -> dict[str, PretrainedComponent]:
        """The text encoder(s) `save_pretrained` writes, by component name (`text_encoder_l`, `text_encoder_g`)."""
        raise NotImplementedError

    @classmethod
    def _load_own_text_encoder(cls, folder: Path, options: Mapping[str, Any]) -> TTextEncoder:
        """The text encoder(s) `_own_text_encoders` wrote into `folder`, loaded with `options` (device, dtype, mmap)."""
        raise NotImplementedError

    def forward(
        self,
        x: torch.Tensor,
        step: int,
        *,
        clip_text_embedding: torch.Tensor,
        pooled_text_embedding: torch.Tensor,
        time_ids: torch.Tensor,
        condition_scale: float = 5.0,
    ) -> torch.Tensor:
        """One denoising step: the solver's next latents after the UNet's noise prediction at `step`.

        Classifier-free guidance: the UNet runs once on the batch `[x, x]` with the embeddings and time ids of
        `compute_clip_text_embedding` and `time_ids` (negative first); the predictions are combined as
        `negative + condition_scale * (positive - negative)`. Raises ValueError when the conditions do not hold a
        negative and a positive row per latent.
        """
        timestep = self.solver.timesteps[step]
        unet_input = self.solver.scale_model_input(x, step)
        predicted_noise = self.compute_noise(
            unet_input, timestep, clip_text_embedding, pooled_text_embedding, time_ids, condition_scale
        )
        return self.solver.step(x, predicted_noise, step)

    def compute_noise(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        clip_text_embedding: torch.Tensor,
        pooled_text_embedding: torch.Tensor,
        time_ids: torch.Tensor,
        condition_scale: float,
    ) -> torch.Tensor:
        """The noise predicted in the (already scaled) latents `x` at `timestep`, with classifier-free guidance."""
        for name, condition in (
            ("clip_text_embedding", clip_text_embedding),
            ("pooled_text_embedding", pooled_text_embedding),
            ("time_ids", time_ids),
        ):
            if condition.shape[0] != 2 * x.shape[0]:
                raise ValueError(
                    f"{name} must hold a negative and a positive row per latent: {2 * x.shape[0]} for "
                    f"{x.shape[0]} latents, got {condition.shape[0]}"
                )
        self.unet.set_timestep(timestep)
        self.unet.set_clip_text_embedding(clip_text_embedding)
        self.unet.set_pooled_text_embedding(pooled_text_embedding)
        self.unet.set_time_ids(time_ids)
        return self.guided_noise(x, condition_scale)


def text_encoder_g_with_tokenizer(text_encoder: CLIPTextEncoderG, tokenizer: CLIPTokenizer | None) -> CLIPTextEncoderG:
    """`text_encoder` with `tokenizer` (the one a folder's `tokenizer_2/` describes) when there is one."""
    if tokenizer is not None:
        text_encoder.set_tokenizer(tokenizer)
    return text_encoder
