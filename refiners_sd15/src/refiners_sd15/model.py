"""`StableDiffusion_1`: the UNet, the autoencoder and the CLIP text encoder of Stable Diffusion 1.5."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

import refiners_core.fluxion as fl
from refiners_core.weights import WeightsError, load_tensors
from refiners_sd15.autoencoder import SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderL
from refiners_sd15.loading import PathOrRepoId, load_single_file_component
from refiners_sd15.unet import SD1UNet

OWN_INDEX = "refiners_sd15.json"
OWN_FILES = {"unet": "unet.safetensors", "lda": "lda.safetensors", "clip_text_encoder": "clip_text_encoder.safetensors"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")


class StableDiffusion_1(fl.Module):
    """Stable Diffusion 1.5: `unet`, `lda` (the autoencoder) and `clip_text_encoder`.

    `StableDiffusion_1()` builds the published architecture with random weights; `from_pretrained` reads a
    diffusers folder or hub id, our own `save_pretrained` folder, or an original single-file checkpoint.
    """

    def __init__(
        self,
        unet: SD1UNet | None = None,
        lda: SD1Autoencoder | None = None,
        clip_text_encoder: CLIPTextEncoderL | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet if unet is not None else SD1UNet(device=device, dtype=dtype)
        self.lda = lda if lda is not None else SD1Autoencoder(device=device, dtype=dtype)
        self.clip_text_encoder = (
            clip_text_encoder if clip_text_encoder is not None else CLIPTextEncoderL(device=device, dtype=dtype)
        )

    @torch.no_grad()
    def compute_clip_text_embedding(self, text: str | list[str], negative_text: str | list[str] = "") -> torch.Tensor:
        """Text embeddings for classifier-free guidance: `(2, 77, 768)` for one prompt, the negative one first."""
        texts = [text] if isinstance(text, str) else list(text)
        negatives = [negative_text] * len(texts) if isinstance(negative_text, str) else list(negative_text)
        if len(negatives) != len(texts):
            raise ValueError(f"got {len(texts)} prompts but {len(negatives)} negative prompts")
        embeddings = self.clip_text_encoder([*negatives, *texts])
        return embeddings

    @classmethod
    def from_pretrained(
        cls,
        path_or_repo_id: PathOrRepoId,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
    ) -> StableDiffusion_1:
        """Load from a diffusers folder or hub id (`unet/`, `vae/`, `text_encoder/`), a folder written by
        `save_pretrained`, or an original single-file checkpoint (`.safetensors`/`.ckpt`).

        `variant` picks e.g. the `fp16` weight files of a diffusers repository. `tokenizer/` and `scheduler/`
        folders are not needed: the tokenizer ships with this package and solvers are ours. Raises
        FileNotFoundError naming a missing component and WeightsError naming the file, key and layer at fault.
        """
        local = Path(path_or_repo_id).expanduser()
        if local.is_file():
            return cls.from_single_file(local, device=device, dtype=dtype)
        if (local / OWN_INDEX).is_file():
            return cls._from_own_folder(local, device=device, dtype=dtype)
        return cls(
            unet=SD1UNet.from_pretrained(
                path_or_repo_id, device=device, dtype=dtype, variant=variant, revision=revision
            ),
            lda=SD1Autoencoder.from_pretrained(
                path_or_repo_id, device=device, dtype=dtype, variant=variant, revision=revision
            ),
            clip_text_encoder=CLIPTextEncoderL.from_pretrained(
                path_or_repo_id, device=device, dtype=dtype, variant=variant, revision=revision
            ),
        )

    @classmethod
    def from_single_file(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> StableDiffusion_1:
        """Load an original SD1.5 checkpoint (`model.diffusion_model.*`, `first_stage_model.*`,
        `cond_stage_model.transformer.*` keys); other entries (EMA copies, noise schedule) are ignored."""
        path = Path(path)
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise WeightsError(f"{path}: not a checkpoint file (expected one of {', '.join(SINGLE_FILE_SUFFIXES)})")
        tensors = load_tensors(path)
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
        index = {"format": "refiners-sd15", "components": OWN_FILES}
        (folder / OWN_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def _from_own_folder(
        cls, folder: Path, *, device: torch.device | str | None, dtype: torch.dtype | None
    ) -> StableDiffusion_1:
        return cls(
            unet=SD1UNet.from_pretrained(folder / OWN_FILES["unet"], device=device, dtype=dtype),
            lda=SD1Autoencoder.from_pretrained(folder / OWN_FILES["lda"], device=device, dtype=dtype),
            clip_text_encoder=CLIPTextEncoderL.from_pretrained(
                folder / OWN_FILES["clip_text_encoder"], device=device, dtype=dtype
            ),
        )
