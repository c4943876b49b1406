"""`StableDiffusion_XL`: the SDXL UNet, the autoencoder and the two CLIP text encoders, and the denoising loop that
drives them with a solver (refiners-sd15's `LatentDiffusionModel`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Self

import torch

from refiners_core.weights import load_tensors
from refiners_sd15 import SD1Autoencoder
from refiners_sd15.clip import SDXL_TEXT_ENCODER_FORMAT, CLIPTextEncoderG, CLIPTextEncoderL, DoubleTextEncoder
from refiners_sd15.loading import PathOrRepoId, load_component
from refiners_sd15.solvers import Solver
from refiners_sd15.unet import UNetConfig
from refiners_sdxl.config import SDXL_AUTOENCODER
from refiners_sdxl.denoising import SDXLDenoisingModel
from refiners_sdxl.folder import BASE_PIPELINE, SCHEDULER_DEFAULTS, check_sdxl_components, read_sdxl_folder
from refiners_sdxl.single_file import load_sdxl_single_file
from refiners_sdxl.unet import SDXLUNet

DEFAULT_SIZE = (1024, 1024)
OWN_INDEX = "refiners_sdxl.json"
OWN_FILES = {
    "unet": "unet.safetensors",
    "lda": "lda.safetensors",
    "text_encoder_l": "text_encoder_l.safetensors",
    "text_encoder_g": "text_encoder_g.safetensors",
}
SD15_OWN_INDEX = "refiners_sd15.json"
REFINER_OWN_INDEX = "refiners_sdxl_refiner.json"


class StableDiffusion_XL(SDXLDenoisingModel):
    """Stable Diffusion XL (base): `unet`, `lda` (the autoencoder) and `clip_text_encoder` (CLIP-L and CLIP-G), driven
    by `solver`.

    `StableDiffusion_XL()` builds the published architecture with random weights; `from_pretrained` reads a
    diffusers folder or hub id.

        sdxl = StableDiffusion_XL.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
        sdxl.solver = DPMSolver(num_inference_steps=30)  # the default solver, with SDXL's "leading" spacing
        clip_text_embedding, pooled_text_embedding = sdxl.compute_clip_text_embedding("a cute cat", negative_text="")
        time_ids = sdxl.time_ids(original_size=(1024, 1024), crop_top_left=(0, 0), target_size=(1024, 1024))
        with torch.no_grad():
            x = sdxl.init_latents(size=(1024, 1024), seed=2)
            for step in sdxl.steps:
                x = sdxl(x, step=step, clip_text_embedding=clip_text_embedding,
                         pooled_text_embedding=pooled_text_embedding, time_ids=time_ids, condition_scale=5.0)
        image = sdxl.lda.latents_to_image(x)

    `solver_defaults` are the solver settings of the model's scheduler config (SDXL's: "leading" timesteps, offset
    1); a solver set on the model takes those it was not given (a spacing given explicitly is kept), and the default
    solver is `DPMSolver(num_inference_steps=30)`. Raises ValueError, naming the
    components and their widths, for a UNet and text encoders that do not fit each other, or a UNet that does not
    take 4 input channels (an inpainting UNet: `StableDiffusion_XL_Inpainting`).
    """

    pipelines: ClassVar[tuple[str, ...]] = (BASE_PIPELINE,)
    """The diffusers pipelines (`_class_name` of `model_index.json`) whose folders `from_pretrained` reads."""
    unet_in_channels: ClassVar[int] = 4
    """The input channels the UNet must take."""

    def __init__(
        self,
        unet: SDXLUNet | None = None,
        lda: SD1Autoencoder | None = None,
        clip_text_encoder: DoubleTextEncoder | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | None = None,
        solver_defaults: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        unet = unet if unet is not None else SDXLUNet(device=device, dtype=dtype)
        self.check_unet_in_channels(unet.config)
        if clip_text_encoder is None:
            clip_text_encoder = DoubleTextEncoder(device=device, dtype=dtype)
        check_sdxl_components(
            unet.config, clip_text_encoder.text_encoder_l.config, clip_text_encoder.text_encoder_g.config
        )
        super().__init__(
            unet,
            lda if lda is not None else SD1Autoencoder(SDXL_AUTOENCODER, device=device, dtype=dtype),
            solver=solver,
            solver_defaults=SCHEDULER_DEFAULTS if solver_defaults is None else solver_defaults,
            show_progress=show_progress,
        )
        self.clip_text_encoder = clip_text_encoder

    @torch.no_grad()
    def compute_clip_text_embedding(
        self, text: str | list[str], negative_text: str | list[str] = ""
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and pooled text embeddings for classifier-free guidance, the negative ones first: `(2, 77, 2048)` and
        `(2, 1280)` for one prompt (`(2N, ...)` for N). Raises ValueError for lists of different lengths."""
        texts = [text] if isinstance(text, str) else list(text)
        negatives = [negative_text] * len(texts) if isinstance(negative_text, str) else list(negative_text)
        if len(negatives) != len(texts):
            raise ValueError(f"got {len(texts)} prompts but {len(negatives)} negative prompts")
        return self.clip_text_encoder([*negatives, *texts])

    def time_ids(
        self,
        original_size: tuple[int, int] = DEFAULT_SIZE,
        crop_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] = DEFAULT_SIZE,
        *,
        negative_original_size: tuple[int, int] | None = None,
        negative_crop_top_left: tuple[int, int] | None = None,
        negative_target_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """SDXL's micro-conditioning for classifier-free guidance, `(2, 6)`, the negative row first, in diffusers'
        order: original (height, width), crop (top, left), target (height, width). The negative values default to
        the positive ones, as in diffusers' `StableDiffusionXLPipeline`."""
        positive = (*original_size, *crop_top_left, *target_size)
        negative = (
            *(negative_original_size or original_size),
            *(negative_crop_top_left or crop_top_left),
            *(negative_target_size or target_size),
        )
        return torch.tensor([negative, positive], device=self.unet.device, dtype=self.unet.dtype)

    @property
    def default_time_ids(self) -> torch.Tensor:
        """`time_ids()` for 1024x1024 images, uncropped: `[[1024, 1024, 0, 0, 1024, 1024]] * 2`."""
        return self.time_ids()

    @classmethod
    def check_unet_in_channels(cls, config: UNetConfig) -> None:
        """Raise ValueError naming the UNet's `in_channels` unless it takes `unet_in_channels` channels."""
        if config.in_channels != cls.unet_in_channels:
            kind = (
                " (an inpainting UNet: load it with StableDiffusion_XL_Inpainting)" if config.in_channels == 9 else ""
            )
            raise ValueError(
                f"{cls.__name__} needs a UNet with {cls.unet_in_channels} input channels, the unet takes "
                f"{config.in_channels} (in_channels){kind}"
            )

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: PathOrRepoId,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
    ) -> Self:
        """Load from a diffusers `StableDiffusionXLPipeline` folder or hub id: `unet/`, `vae/`, `text_encoder/`,
        `text_encoder_2/` (and `scheduler/` for the solver's settings, `tokenizer_2/tokenizer_config.json` for CLIP-G's
        pad token and length; the tokenizers' vocabulary ships with refiners-sd15), or
        from a folder written by `save_pretrained`, or an original single-file checkpoint (`from_single_file`).

        Configs are read and checked before any weight (see `read_sdxl_folder`); weights are memory-mapped and
        every parameter lands on `device` with `dtype`. Raises ValueError naming `model_index.json` for another
        pipeline (SD1.5, the refiner) or the components that do not fit each other, FileNotFoundError naming a
        missing component, WeightsError naming the file, key and layer at fault.
        """
        local = Path(path_or_repo_id).expanduser()
        if local.is_file():
            return cls.from_single_file(local, device=device, dtype=dtype)
        if (local / OWN_INDEX).is_file():
            return cls._from_own_folder(local, device=device, dtype=dtype)
        if (local / REFINER_OWN_INDEX).is_file():
            raise ValueError(
                f"{local / REFINER_OWN_INDEX}: an SDXL refiner saved by StableDiffusion_XL_Refiner.save_pretrained, "
                "not a base model: load it with StableDiffusion_XL_Refiner"
            )
        if (local / SD15_OWN_INDEX).is_file():
            raise ValueError(
                f"{local / SD15_OWN_INDEX}: a Stable Diffusion 1.5 model saved by StableDiffusion_1.save_pretrained, "
                "not an SDXL one: load it with StableDiffusion_1"
            )
        folder = read_sdxl_folder(path_or_repo_id, revision=revision, pipelines=cls.pipelines)
        cls.check_unet_in_channels(folder.unet)
        options: dict[str, Any] = {"device": device, "dtype": dtype, "variant": variant, "revision": revision}
        text_encoder_g = CLIPTextEncoderG.from_pretrained(path_or_repo_id, **options)
        if folder.tokenizer_2 is not None:
            text_encoder_g.set_tokenizer(folder.tokenizer_2)
        return cls(
            unet=SDXLUNet.from_pretrained(path_or_repo_id, **options),
            lda=SD1Autoencoder.from_pretrained(path_or_repo_id, **options),
            clip_text_encoder=DoubleTextEncoder(
                load_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, path_or_repo_id, **options), text_encoder_g
            ),
            solver_defaults=folder.solver_defaults,
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Self:
        """Load an original SDXL base checkpoint (`sd_xl_base_1.0.safetensors`: `model.diffusion_model.*`,
        `conditioner.embedders.0.*` and `.1.*`, `first_stage_model.*`), each config read from the tensors' shapes
        (so a scaled-down checkpoint loads too; heads of 64 channels, 256 features per time id and the 0.13025
        latent scale are SDXL's, as the weights do not store them). Raises ValueError naming the file and key for an
        SD1.5 checkpoint or a refiner, WeightsError naming the file, key and layer for weights that do not fit."""
        path = Path(path)
        tensors = load_tensors(path)
        unet, lda, clip_text_encoder = load_sdxl_single_file(path, tensors, device=device, dtype=dtype)
        return cls(unet=unet, lda=lda, clip_text_encoder=clip_text_encoder)

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write the four components in our own format (one safetensors file each, its config in the metadata) and
        `refiners_sdxl.json` (the files and the solver defaults) into `folder`, which `from_pretrained` reads back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save(folder / OWN_FILES["unet"])
        self.lda.save(folder / OWN_FILES["lda"])
        self.clip_text_encoder.text_encoder_l.save(folder / OWN_FILES["text_encoder_l"])
        self.clip_text_encoder.text_encoder_g.save(folder / OWN_FILES["text_encoder_g"])
        index = {"format": "refiners-sdxl", "components": OWN_FILES, "solver_defaults": self.solver_defaults}
        (folder / OWN_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def _from_own_folder(cls, folder: Path, *, device: torch.device | str | None, dtype: torch.dtype | None) -> Self:
        index_path = folder / OWN_INDEX
        try:
            index: dict[str, Any] = json.loads(index_path.read_text(encoding="utf-8"))
            solver_defaults: dict[str, Any] = index["solver_defaults"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{index_path}: cannot read the index written by save_pretrained: {error}") from error
        files = {name: folder / file for name, file in OWN_FILES.items()}
        return cls(
            unet=SDXLUNet.from_pretrained(files["unet"], device=device, dtype=dtype),
            lda=SD1Autoencoder.from_pretrained(files["lda"], device=device, dtype=dtype),
            clip_text_encoder=DoubleTextEncoder(
                CLIPTextEncoderL.from_pretrained(files["text_encoder_l"], device=device, dtype=dtype),
                CLIPTextEncoderG.from_pretrained(files["text_encoder_g"], device=device, dtype=dtype),
            ),
            solver_defaults=solver_defaults,
        )
