"""`StableDiffusion_XL_Refiner`: the SDXL refiner (CLIP-G text only, the aesthetic score in its time ids), run after
the base model on the last part of the schedule, and `refiner_first_step` (refiners-sd15's `denoising_end_step`), where
that part starts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from refiners_sd15 import SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderG, CLIPTokenizer
from refiners_sd15.loading import PathOrRepoId, PretrainedComponent
from refiners_sd15.unet import UNetConfig
from refiners_sdxl.config import SDXL_REFINER_UNET
from refiners_sdxl.denoising import SDXLDenoisingModel, text_encoder_g_with_tokenizer
from refiners_sdxl.folder import check_sdxl_refiner_components, read_sdxl_refiner_folder
from refiners_sdxl.own_format import REFINER_OWN_INDEX, component_file
from refiners_sdxl.single_file import load_sdxl_refiner_single_file
from refiners_sdxl.unet import SDXLUNet

DEFAULT_SIZE = (1024, 1024)


class StableDiffusion_XL_Refiner(SDXLDenoisingModel[CLIPTextEncoderG]):
    """The SDXL refiner: `unet` (CLIP-G text only, five time ids), `lda` and `clip_text_encoder` (CLIP-G), driven by
    `solver`, usually on the last steps of a run whose first steps the base model made.

        sdxl = StableDiffusion_XL.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
        refiner = StableDiffusion_XL_Refiner.from_pretrained("stabilityai/stable-diffusion-xl-refiner-1.0")
        sdxl.solver = DPMSolver(num_inference_steps=40)  # with the model's spacing (SDXL's: "leading")
        handover = refiner_first_step(sdxl.solver, denoising_end=0.8)
        x = sdxl.init_latents(size=(1024, 1024), seed=2)
        for step in range(handover):
            x = sdxl(x, step=step, clip_text_embedding=..., pooled_text_embedding=..., time_ids=sdxl.default_time_ids)
        refiner.solver = DPMSolver(num_inference_steps=40, first_inference_step=handover)
        clip_text_embedding, pooled_text_embedding = refiner.compute_clip_text_embedding("a cute cat")
        for step in refiner.steps:
            x = refiner(x, step=step, clip_text_embedding=clip_text_embedding,
                        pooled_text_embedding=pooled_text_embedding, time_ids=refiner.default_time_ids)

    `from_pretrained` reads a diffusers folder or hub id, a folder written by `save_pretrained`, or an original single
    file (`sd_xl_refiner_1.0.safetensors`). Raises ValueError, naming the components and their widths, for a UNet and
    text encoder that do not fit each other (see `check_sdxl_refiner_components`).
    """

    default_unet: ClassVar[UNetConfig] = SDXL_REFINER_UNET
    own_index: ClassVar[str] = REFINER_OWN_INDEX

    def time_ids(
        self,
        original_size: tuple[int, int] = DEFAULT_SIZE,
        crop_top_left: tuple[int, int] = (0, 0),
        aesthetic_score: float = 6.0,
        *,
        negative_original_size: tuple[int, int] | None = None,
        negative_crop_top_left: tuple[int, int] | None = None,
        negative_aesthetic_score: float = 2.5,
    ) -> torch.Tensor:
        """The refiner's micro-conditioning for classifier-free guidance, `(2, 5)`, the negative row first, in
        diffusers' order: original (height, width), crop (top, left), aesthetic score. The defaults are diffusers'
        `StableDiffusionXLImg2ImgPipeline`'s: aesthetic scores 6 and 2.5, negative sizes and crops as the positive."""
        positive = (*original_size, *crop_top_left, aesthetic_score)
        negative = (
            *(negative_original_size or original_size),
            *(negative_crop_top_left or crop_top_left),
            negative_aesthetic_score,
        )
        return torch.tensor([negative, positive], device=self.unet.device, dtype=self.unet.dtype)

    @property
    def default_time_ids(self) -> torch.Tensor:
        """`time_ids()` for 1024x1024 images, uncropped, aesthetic scores 6 and 2.5."""
        return self.time_ids()

    @classmethod
    def _default_text_encoder(cls, *, device: torch.device | str | None, dtype: torch.dtype | None) -> CLIPTextEncoderG:
        return CLIPTextEncoderG(device=device, dtype=dtype)

    @classmethod
    def _check_components(cls, unet: UNetConfig, clip_text_encoder: CLIPTextEncoderG) -> None:
        check_sdxl_refiner_components(unet, clip_text_encoder.config)

    @classmethod
    def _read_folder(
        cls, path_or_repo_id: PathOrRepoId, *, revision: str | None
    ) -> tuple[dict[str, Any], CLIPTokenizer | None]:
        folder = read_sdxl_refiner_folder(path_or_repo_id, revision=revision)
        return folder.solver_defaults, folder.tokenizer_2

    @classmethod
    def _load_text_encoder(
        cls, path_or_repo_id: PathOrRepoId, options: Mapping[str, Any], tokenizer_2: CLIPTokenizer | None
    ) -> CLIPTextEncoderG:
        return text_encoder_g_with_tokenizer(CLIPTextEncoderG.from_pretrained(path_or_repo_id, **options), tokenizer_2)

    @classmethod
    def _load_single_file(
        cls, path: Path, tensors: Mapping[str, torch.Tensor], options: Mapping[str, Any]
    ) -> tuple[SDXLUNet, SD1Autoencoder, CLIPTextEncoderG]:
        return load_sdxl_refiner_single_file(path, tensors, **options)

    def _own_text_encoders(self) -> dict[str, PretrainedComponent]:
        return {"text_encoder_g": self.clip_text_encoder}

    @classmethod
    def _load_own_text_encoder(cls, folder: Path, options: Mapping[str, Any]) -> CLIPTextEncoderG:
        return CLIPTextEncoderG.from_pretrained(component_file(folder, "text_encoder_g"), **options)
