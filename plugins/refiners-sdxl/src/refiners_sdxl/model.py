"""`StableDiffusion_XL`: the SDXL UNet, the autoencoder and the two CLIP text encoders, and the denoising loop that
drives them with a solver (refiners-sd15's `LatentDiffusionModel`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch

from refiners_sd15 import SD1Autoencoder
from refiners_sd15.architecture import single_file_shapes
from refiners_sd15.clip import (
    SDXL_TEXT_ENCODER_FORMAT,
    CLIPTextEncoderG,
    CLIPTextEncoderL,
    CLIPTokenizer,
    DoubleTextEncoder,
)
from refiners_sd15.loading import PathOrRepoId, PretrainedComponent, load_component, read_own_config
from refiners_sd15.unet import UNetConfig
from refiners_sdxl.config import SDXL_BASE_UNET
from refiners_sdxl.denoising import SDXLDenoisingModel, text_encoder_g_with_tokenizer
from refiners_sdxl.folder import BASE_PIPELINE, check_sdxl_components, read_sdxl_folder
from refiners_sdxl.own_format import BASE_OWN_INDEX, component_file
from refiners_sdxl.single_file import load_sdxl_single_file, read_sdxl_single_file
from refiners_sdxl.unet import SDXLUNet

DEFAULT_SIZE = (1024, 1024)
OWN_INDEX = BASE_OWN_INDEX
"""The index file of the folders `StableDiffusion_XL.save_pretrained` writes."""


class StableDiffusion_XL(SDXLDenoisingModel[DoubleTextEncoder]):
    """Stable Diffusion XL (base): `unet`, `lda` (the autoencoder) and `clip_text_encoder` (CLIP-L and CLIP-G), driven
    by `solver`.

    `StableDiffusion_XL()` builds the published architecture with random weights; `from_pretrained` reads a
    diffusers folder or hub id, a folder written by `save_pretrained`, or an original single file
    (`sd_xl_base_1.0.safetensors`).

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
    default_unet: ClassVar[UNetConfig] = SDXL_BASE_UNET
    own_index: ClassVar[str] = BASE_OWN_INDEX

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
    def architecture(
        cls,
        source: PathOrRepoId | None = None,
        *,
        device: torch.device | str | None = "meta",
        dtype: torch.dtype | None = None,
    ) -> StableDiffusion_XL:
        """The model `from_pretrained(source)` builds, with no weight read (on the meta device by default): the
        published architecture for `source` None, else the UNet and text encoders of the configs of a local diffusers
        folder (their `config.json`), of a folder written by `save_pretrained` (the files' metadata), or of a single
        `.safetensors` checkpoint (the shapes in its header). The autoencoder, which adapters do not patch, is the
        published one. Raises what `from_pretrained` raises about configs, and ValueError naming a single file that is
        not safetensors (its shapes cannot be read without loading it).
        """
        if source is None:
            return cls(device=device, dtype=dtype)
        local = Path(source).expanduser()
        if local.is_file():
            configs = read_sdxl_single_file(local, single_file_shapes(local))
            unet, text_l, text_g = configs.unet, configs.text_encoder, configs.text_encoder_2
        elif (local / cls.own_index).is_file():
            unet = read_own_config(SDXLUNet.component_format, component_file(local, "unet"))
            text_l = read_own_config(CLIPTextEncoderL.component_format, component_file(local, "text_encoder_l"))
            text_g = read_own_config(CLIPTextEncoderG.component_format, component_file(local, "text_encoder_g"))
        else:
            folder = read_sdxl_folder(source, pipelines=cls.pipelines)
            unet, text_l, text_g = folder.unet, folder.text_encoder, folder.text_encoder_2
        cls.check_unet_in_channels(unet)
        return cls(
            unet=SDXLUNet(unet, device=device, dtype=dtype),
            clip_text_encoder=DoubleTextEncoder(
                CLIPTextEncoderL(text_l, device=device, dtype=dtype),
                CLIPTextEncoderG(text_g, device=device, dtype=dtype),
            ),
            device=device,
            dtype=dtype,
        )

    @classmethod
    def check_unet_in_channels(cls, config: UNetConfig, source: Path | None = None) -> None:
        """Raise ValueError naming the UNet's `in_channels` (and `source`, the file it comes from) unless it takes
        `unet_in_channels` channels."""
        if config.in_channels != cls.unet_in_channels:
            kind = (
                " (an inpainting UNet: load it with StableDiffusion_XL_Inpainting)" if config.in_channels == 9 else ""
            )
            where = f"{source}: " if source is not None else ""
            raise ValueError(
                f"{where}{cls.__name__} needs a UNet with {cls.unet_in_channels} input channels, the unet takes "
                f"{config.in_channels} (in_channels){kind}"
            )

    @classmethod
    def _default_text_encoder(
        cls, *, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> DoubleTextEncoder:
        return DoubleTextEncoder(device=device, dtype=dtype)

    @classmethod
    def _check_components(cls, unet: UNetConfig, clip_text_encoder: DoubleTextEncoder) -> None:
        cls.check_unet_in_channels(unet)
        check_sdxl_components(unet, clip_text_encoder.text_encoder_l.config, clip_text_encoder.text_encoder_g.config)

    @classmethod
    def _read_folder(
        cls, path_or_repo_id: PathOrRepoId, *, revision: str | None
    ) -> tuple[dict[str, Any], CLIPTokenizer | None]:
        folder = read_sdxl_folder(path_or_repo_id, revision=revision, pipelines=cls.pipelines)
        cls.check_unet_in_channels(folder.unet)
        return folder.solver_defaults, folder.tokenizer_2

    @classmethod
    def _load_text_encoder(
        cls, path_or_repo_id: PathOrRepoId, options: Mapping[str, Any], tokenizer_2: CLIPTokenizer | None
    ) -> DoubleTextEncoder:
        return DoubleTextEncoder(
            load_component(CLIPTextEncoderL, SDXL_TEXT_ENCODER_FORMAT, path_or_repo_id, **options),
            text_encoder_g_with_tokenizer(CLIPTextEncoderG.from_pretrained(path_or_repo_id, **options), tokenizer_2),
        )

    @classmethod
    def _load_single_file(
        cls, path: Path, tensors: Mapping[str, torch.Tensor], options: Mapping[str, Any]
    ) -> tuple[SDXLUNet, SD1Autoencoder, DoubleTextEncoder]:
        cls.check_unet_in_channels(read_sdxl_single_file(path, tensors).unet, source=path)
        return load_sdxl_single_file(path, tensors, **options)

    def _own_text_encoders(self) -> dict[str, PretrainedComponent]:
        return {
            "text_encoder_l": self.clip_text_encoder.text_encoder_l,
            "text_encoder_g": self.clip_text_encoder.text_encoder_g,
        }

    @classmethod
    def _load_own_text_encoder(cls, folder: Path, options: Mapping[str, Any]) -> DoubleTextEncoder:
        return DoubleTextEncoder(
            CLIPTextEncoderL.from_pretrained(component_file(folder, "text_encoder_l"), **options),
            CLIPTextEncoderG.from_pretrained(component_file(folder, "text_encoder_g"), **options),
        )
