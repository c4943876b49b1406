"""`StableDiffusion_1`: the UNet, the autoencoder and the CLIP text encoder of Stable Diffusion 1.5, and the
denoising loop that drives them with a solver."""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

import refiners_core.fluxion as fl
from refiners_core.checks import check_finite, check_finite_tensor
from refiners_core.module_names import DIFFUSERS, prefixed
from refiners_core.weights import WeightsError, load_tensors
from refiners_sd15.autoencoder import SD1Autoencoder
from refiners_sd15.clip import CLIPTextEncoderL
from refiners_sd15.loading import PathOrRepoId, load_located, load_single_file_component, locate_component
from refiners_sd15.solvers import DPMSolver, Solver
from refiners_sd15.unet import SD1UNet

OWN_INDEX = "refiners_sd15.json"
OWN_FILES = {"unet": "unet.safetensors", "lda": "lda.safetensors", "clip_text_encoder": "clip_text_encoder.safetensors"}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth", ".pt", ".bin")
MAX_IMAGE_SIDE = 8192
"""The largest width or height, in pixels, of a generated image, an init image or a mask."""
MAX_IMAGE_PIXELS = 4096 * 4096
"""The largest width times height of a generated image (16.8 megapixels: 4096x4096, or 8192x2048)."""


def check_image_size(width: int, height: int, what: str = "image size") -> None:
    """Raise ValueError, naming `what` and the size, unless `width`x`height` is a size SD1.5 can generate: positive
    multiples of 8, each side at most `MAX_IMAGE_SIDE` and the area at most `MAX_IMAGE_PIXELS`.

    Checked before anything is allocated: a 100000x100000 request is refused at once rather than dying in the
    allocator.
    """
    try:
        width, height = operator.index(width), operator.index(height)
    except TypeError:
        raise ValueError(f"{what} must be integers, got {width!r}x{height!r}") from None
    if width <= 0 or height <= 0 or width % 8 or height % 8:
        raise ValueError(f"{what} {width}x{height} (width x height): each side must be a positive multiple of 8")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise ValueError(f"{what} {width}x{height} (width x height): each side must be at most {MAX_IMAGE_SIDE}")
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{what} {width}x{height} (width x height) has {width * height} pixels, more than the {MAX_IMAGE_PIXELS} "
            "(4096x4096) allowed"
        )


def check_input_image(image: object, what: str = "image") -> None:
    """Raise TypeError unless `image` is a PIL image, ValueError naming `what` unless each of its sides is from 1 to
    `MAX_IMAGE_SIDE` pixels (init images and masks are resized to the generated size: this bounds what is read)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"{what} must be a PIL.Image.Image, got {type(image).__name__}")
    width, height = image.size
    if not (1 <= width <= MAX_IMAGE_SIDE and 1 <= height <= MAX_IMAGE_SIDE):
        raise ValueError(
            f"{what} is {width}x{height} (width x height): each side must be from 1 to {MAX_IMAGE_SIDE} pixels"
        )


def _prompts(what: str, value: object, copies: int) -> list[str]:
    """`value`, a string (repeated `copies` times) or a list or tuple of strings, as a list; TypeError otherwise."""
    prompts: list[object] = [value] * copies if isinstance(value, str) else []
    if isinstance(value, list | tuple):
        prompts = list(value)  # pyright: ignore[reportUnknownArgumentType]
    elif not isinstance(value, str):
        prompts = [value]
    for prompt in prompts:
        if not isinstance(prompt, str):
            raise TypeError(f"a {what} must be a string, got {type(prompt).__name__} {prompt!r:.50}")
    return [str(prompt) for prompt in prompts]


MAX_SEED = 2**64 - 1
"""The largest seed (torch's generators take 64-bit seeds)."""


class StableDiffusion_1(fl.Module):
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
        show_progress: bool = True,
    ) -> None:
        super().__init__()
        self.solver: Solver = solver if solver is not None else DPMSolver(num_inference_steps=30)
        self.show_progress = show_progress
        self.unet = unet if unet is not None else SD1UNet(device=device, dtype=dtype)
        self.lda = lda if lda is not None else SD1Autoencoder(device=device, dtype=dtype)
        self.clip_text_encoder = (
            clip_text_encoder if clip_text_encoder is not None else CLIPTextEncoderL(device=device, dtype=dtype)
        )

    @torch.no_grad()
    def compute_clip_text_embedding(self, text: str | list[str], negative_text: str | list[str] = "") -> torch.Tensor:
        """Text embeddings for classifier-free guidance: `(2, 77, 768)` for one prompt, the negative one first.

        Raises TypeError if a prompt is not a string, ValueError if the counts of prompts and negative prompts
        differ or there is no prompt.
        """
        texts = _prompts("prompt", text, 1)
        negatives = _prompts("negative prompt", negative_text, len(texts))
        if not texts:
            raise ValueError("compute_clip_text_embedding needs at least one prompt")
        if len(negatives) != len(texts):
            raise ValueError(f"got {len(texts)} prompts but {len(negatives)} negative prompts")
        embeddings = self.clip_text_encoder([*negatives, *texts])
        return embeddings

    @property
    def steps(self) -> Iterable[int]:
        """The solver's inference steps, with a tqdm progress bar unless `show_progress` is False."""
        return tqdm(self.solver.inference_steps, desc="denoising", unit="step", disable=not self.show_progress)

    def init_latents(
        self,
        size: tuple[int, int],
        init_image: Image.Image | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> torch.Tensor:
        """The latents a denoising run starts from, for an image of `size = (height, width)` pixels.

        `noise` (shape `(1, latent_channels, height / 8, width / 8)`) is drawn when not given, from `generator` or
        `seed`, on the CPU in the model's dtype as diffusers does: a seed gives the same noise on every device.
        Without `init_image`, the noise is scaled by the solver's `init_noise_sigma`; with one (resized to `size`),
        its latents are noised to the level of the solver's `first_inference_step` (image-to-image); its pixels are
        read by meaning (`refiners_core.images.to_rgb`: 16-bit and float images are scaled, not clipped). Raises
        ValueError, before allocating anything, for a size `check_image_size` refuses (multiples of 8, each side at
        most `MAX_IMAGE_SIDE`, at most `MAX_IMAGE_PIXELS`), an `init_image` with a side over `MAX_IMAGE_SIDE`, a
        noise of the wrong shape or with NaN or infinite values, a seed outside 0 to `MAX_SEED`, both a generator and
        a seed, or a solver that starts later than its first step without an `init_image`.
        """
        try:
            height, width = size
        except (TypeError, ValueError):
            raise ValueError(f"init_latents size must be (height, width), got {size!r}") from None
        check_image_size(width, height, "init_latents size")
        if init_image is not None:
            check_input_image(init_image, "init_latents init_image")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):  # pyright: ignore[reportUnnecessaryIsInstance]
            raise ValueError(f"init_latents seed must be an integer from 0 to 2**64-1, got {seed!r}")
        factor = self.lda.downscale_factor
        if height % factor or width % factor:
            raise ValueError(f"size (height, width) must be positive multiples of {factor}, got {size}")
        shape = (1, self.lda.config.latent_channels, height // factor, width // factor)
        if noise is None:
            if generator is not None and seed is not None:
                raise ValueError("give init_latents a generator or a seed, not both")
            if seed is not None:
                generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(shape, generator=generator, dtype=self.unet.dtype)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} for size {size}, got {tuple(noise.shape)}")
        else:
            check_finite_tensor("noise", noise)
        noise = noise.to(device=self.unet.device, dtype=self.unet.dtype)
        if init_image is None:
            if self.solver.first_inference_step > 0:
                raise ValueError(
                    f"the solver starts at step {self.solver.first_inference_step}: image-to-image needs an init_image"
                )
            return noise * self.solver.init_noise_sigma
        if init_image.size != (width, height):
            init_image = init_image.resize((width, height), Image.Resampling.LANCZOS)
        latents = self.lda.image_to_latents(init_image).to(dtype=noise.dtype)
        return self.solver.add_noise(latents, noise, self.solver.first_inference_step)

    def forward(
        self, x: torch.Tensor, step: int, *, clip_text_embedding: torch.Tensor, condition_scale: float = 7.5
    ) -> torch.Tensor:
        """One denoising step: the solver's next latents after the UNet's noise prediction at `step`.

        Classifier-free guidance: the UNet runs once on the batch `[x, x]` with `clip_text_embedding` (negative
        embeddings first, as `compute_clip_text_embedding` gives them) and the two predictions are combined as
        `negative + condition_scale * (positive - negative)`. Raises ValueError if `step` is not one of the solver's
        steps (0 to `num_inference_steps - 1`; no negative indexing) or `condition_scale` is not a finite number.
        """
        steps = self.solver.num_inference_steps
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
        check_finite("condition_scale", condition_scale)
        if clip_text_embedding.shape[0] != 2 * x.shape[0]:
            raise ValueError(
                f"clip_text_embedding must hold a negative and a positive embedding per latent: {2 * x.shape[0]} for "
                f"{x.shape[0]} latents, got {clip_text_embedding.shape[0]}"
            )
        self.unet.set_timestep(timestep)
        self.unet.set_clip_text_embedding(clip_text_embedding)
        negative, positive = self.unet(self.unet_input(torch.cat([x, x]))).chunk(2)
        return negative + condition_scale * (positive - negative)

    def unet_input(self, latents: torch.Tensor) -> torch.Tensor:
        """What the UNet gets for `latents` (themselves; the inpainting model adds its conditions)."""
        return latents

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
        located = [
            locate_component(component.component_format, path_or_repo_id, variant=variant, revision=revision)
            for component in (SD1UNet, SD1Autoencoder, CLIPTextEncoderL)
        ]  # every config and weight file checked before any weights are read
        unet, lda, clip_text_encoder = located
        return cls(
            unet=load_located(SD1UNet, unet, device=device, dtype=dtype),
            lda=load_located(SD1Autoencoder, lda, device=device, dtype=dtype),
            clip_text_encoder=load_located(CLIPTextEncoderL, clip_text_encoder, device=device, dtype=dtype),
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
