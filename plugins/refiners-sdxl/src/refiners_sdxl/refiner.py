"""`StableDiffusion_XL_Refiner`: the SDXL refiner (CLIP-G text only, the aesthetic score in its time ids), run after
the base model on the last part of the schedule, and `refiner_first_step` (refiners-sd15's `denoising_end_step`), where
that part starts."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from refiners_sd15 import SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderG
from refiners_sd15.loading import PathOrRepoId
from refiners_sd15.solvers import Solver
from refiners_sdxl.config import SDXL_AUTOENCODER, SDXL_REFINER_UNET
from refiners_sdxl.denoising import SDXLDenoisingModel
from refiners_sdxl.folder import SCHEDULER_DEFAULTS, check_sdxl_refiner_components, read_sdxl_refiner_folder
from refiners_sdxl.unet import SDXLUNet

DEFAULT_SIZE = (1024, 1024)
OWN_INDEX = "refiners_sdxl_refiner.json"
OWN_FILES = {"unet": "unet.safetensors", "lda": "lda.safetensors", "text_encoder_g": "text_encoder_g.safetensors"}
BASE_OWN_INDEX = "refiners_sdxl.json"


class StableDiffusion_XL_Refiner(SDXLDenoisingModel):
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

    Raises ValueError, naming the components and their widths, for a UNet and text encoder that do not fit each
    other (see `check_sdxl_refiner_components`).
    """

    def __init__(
        self,
        unet: SDXLUNet | None = None,
        lda: SD1Autoencoder | None = None,
        clip_text_encoder: CLIPTextEncoderG | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        solver: Solver | None = None,
        solver_defaults: dict[str, Any] | None = None,
        show_progress: bool = True,
    ) -> None:
        unet = unet if unet is not None else SDXLUNet(SDXL_REFINER_UNET, device=device, dtype=dtype)
        if clip_text_encoder is None:
            clip_text_encoder = CLIPTextEncoderG(device=device, dtype=dtype)
        check_sdxl_refiner_components(unet.config, clip_text_encoder.config)
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
        """CLIP-G's text and pooled text embeddings for classifier-free guidance, the negative ones first:
        `(2, 77, 1280)` and `(2, 1280)` for one prompt (`(2N, ...)` for N). Raises ValueError for lists of different
        lengths."""
        texts = [text] if isinstance(text, str) else list(text)
        negatives = [negative_text] * len(texts) if isinstance(negative_text, str) else list(negative_text)
        if len(negatives) != len(texts):
            raise ValueError(f"got {len(texts)} prompts but {len(negatives)} negative prompts")
        return self.clip_text_encoder([*negatives, *texts])

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
    def from_pretrained(
        cls,
        path_or_repo_id: PathOrRepoId,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
    ) -> StableDiffusion_XL_Refiner:
        """Load from a diffusers SDXL refiner folder or hub id (a `StableDiffusionXLImg2ImgPipeline` without
        `text_encoder`): `unet/`, `vae/`, `text_encoder_2/` (and `scheduler/` for the solver's settings,
        `tokenizer_2/tokenizer_config.json` for CLIP-G's pad token and length), or from a
        folder written by `save_pretrained`.

        Configs are read and checked before any weight (see `read_sdxl_refiner_folder`); weights are memory-mapped
        and every parameter lands on `device` with `dtype`. Raises ValueError naming `model_index.json` for a base
        model or another pipeline, or the components that do not fit each other, FileNotFoundError naming a missing
        component, WeightsError naming the file, key and layer at fault.
        """
        local = Path(path_or_repo_id).expanduser()
        if (local / OWN_INDEX).is_file():
            return cls._from_own_folder(local, device=device, dtype=dtype)
        if (local / BASE_OWN_INDEX).is_file():
            raise ValueError(
                f"{local / BASE_OWN_INDEX}: an SDXL base model saved by StableDiffusion_XL.save_pretrained, not a "
                "refiner: load it with StableDiffusion_XL"
            )
        folder = read_sdxl_refiner_folder(path_or_repo_id, revision=revision)
        options: dict[str, Any] = {"device": device, "dtype": dtype, "variant": variant, "revision": revision}
        text_encoder_g = CLIPTextEncoderG.from_pretrained(path_or_repo_id, **options)
        if folder.tokenizer_2 is not None:
            text_encoder_g.set_tokenizer(folder.tokenizer_2)
        return cls(
            unet=SDXLUNet.from_pretrained(path_or_repo_id, **options),
            lda=SD1Autoencoder.from_pretrained(path_or_repo_id, **options),
            clip_text_encoder=text_encoder_g,
            solver_defaults=folder.solver_defaults,
        )

    def save_pretrained(self, folder: str | os.PathLike[str]) -> None:
        """Write the three components in our own format (one safetensors file each, its config in the metadata) and
        `refiners_sdxl_refiner.json` (the files and the solver defaults) into `folder`, which `from_pretrained` reads
        back."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save(folder / OWN_FILES["unet"])
        self.lda.save(folder / OWN_FILES["lda"])
        self.clip_text_encoder.save(folder / OWN_FILES["text_encoder_g"])
        index = {"format": "refiners-sdxl-refiner", "components": OWN_FILES, "solver_defaults": self.solver_defaults}
        (folder / OWN_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def _from_own_folder(
        cls, folder: Path, *, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> StableDiffusion_XL_Refiner:
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
            clip_text_encoder=CLIPTextEncoderG.from_pretrained(files["text_encoder_g"], device=device, dtype=dtype),
            solver_defaults=solver_defaults,
        )
