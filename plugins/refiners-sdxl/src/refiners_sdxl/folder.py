"""Read and check a diffusers SDXL folder before any weight is loaded: what `model_index.json` says it is, the
configs of its UNet and text encoders (and whether they fit each other), and its scheduler's timestep settings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refiners_core.weights import resolve_path
from refiners_sd15.clip import (
    SDXL_TEXT_ENCODER_2_FORMAT,
    SDXL_TEXT_ENCODER_FORMAT,
    CLIPTextEncoderConfig,
    CLIPTokenizer,
)
from refiners_sd15.loading import (
    PathOrRepoId,
    read_component_config,
    read_json_object,
    read_scheduler_config,
    scheduler_prediction_type,
)
from refiners_sd15.unet import UNetConfig
from refiners_sdxl.generation_defaults import SCHEDULER_DEFAULTS
from refiners_sdxl.tokenizer_config import read_clip_tokenizer
from refiners_sdxl.unet import SDXL_UNET_FORMAT

BASE_PIPELINE = "StableDiffusionXLPipeline"
INPAINT_PIPELINE = "StableDiffusionXLInpaintPipeline"
IMG2IMG_PIPELINE = "StableDiffusionXLImg2ImgPipeline"
TIME_IDS = 6
"""The base model's micro-conditioning: original size, crop top-left and target size, as (height, width) pairs."""
REFINER_TIME_IDS = 5
"""The refiner's micro-conditioning: original size and crop top-left, as (height, width) pairs, and the aesthetic
score."""

_DIFFUSERS_SCHEDULER_DEFAULTS: dict[str, Any] = {
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
}
"""diffusers' scheduler defaults, for the fields a `scheduler_config.json` leaves out."""


@dataclass(frozen=True)
class SDXLFolder:
    """The configs of a diffusers SDXL base folder, checked to fit each other."""

    unet: UNetConfig
    text_encoder: CLIPTextEncoderConfig
    text_encoder_2: CLIPTextEncoderConfig
    solver_defaults: dict[str, Any]
    tokenizer_2: CLIPTokenizer | None = None
    """CLIP-G's tokenizer as `tokenizer_2/` describes it, None without one (`read_clip_tokenizer`)."""


@dataclass(frozen=True)
class SDXLRefinerFolder:
    """The configs of a diffusers SDXL refiner folder, checked to fit each other."""

    unet: UNetConfig
    text_encoder_2: CLIPTextEncoderConfig
    solver_defaults: dict[str, Any]
    tokenizer_2: CLIPTokenizer | None = None
    """CLIP-G's tokenizer as `tokenizer_2/` describes it, None without one (`read_clip_tokenizer`)."""


def read_sdxl_folder(
    path_or_repo_id: PathOrRepoId, *, revision: str | None = None, pipelines: tuple[str, ...] = (BASE_PIPELINE,)
) -> SDXLFolder:
    """The configs of the SDXL base model in a diffusers folder or hub id, read and checked without its weights.

    `pipelines` are the `_class_name`s `model_index.json` may give (the inpainting model's folder is a
    `StableDiffusionXLInpaintPipeline`). Raises ValueError naming `model_index.json` for another pipeline (an SD1.5
    folder, an SDXL refiner), naming the components and their widths when they do not fit each other (an SD1.5 UNet,
    a text encoder of another width), or naming the file and field of a `tokenizer_2/` ours does not reproduce
    (`read_clip_tokenizer`); FileNotFoundError naming a missing component (`text_encoder_2/`).
    """
    _check_model_index(path_or_repo_id, revision=revision, pipelines=pipelines, refiner=False)
    unet = read_component_config(SDXL_UNET_FORMAT, path_or_repo_id, revision=revision)
    text_encoder = read_component_config(SDXL_TEXT_ENCODER_FORMAT, path_or_repo_id, revision=revision)
    text_encoder_2 = read_component_config(SDXL_TEXT_ENCODER_2_FORMAT, path_or_repo_id, revision=revision)
    check_sdxl_components(unet, text_encoder, text_encoder_2)
    return SDXLFolder(
        unet,
        text_encoder,
        text_encoder_2,
        _solver_defaults(path_or_repo_id, revision=revision),
        read_clip_tokenizer(path_or_repo_id, sequence_length=text_encoder_2.max_sequence_length, revision=revision),
    )


def read_sdxl_refiner_folder(path_or_repo_id: PathOrRepoId, *, revision: str | None = None) -> SDXLRefinerFolder:
    """The configs of an SDXL refiner in a diffusers folder or hub id (`unet/`, `text_encoder_2/`, no
    `text_encoder/`), read and checked without its weights.

    Raises ValueError naming `model_index.json` for a base model (it has a `text_encoder`) or another pipeline,
    naming the components and their widths when they do not fit each other (see `check_sdxl_refiner_components`), or
    naming the file and field of a `tokenizer_2/` ours does not reproduce (`read_clip_tokenizer`); FileNotFoundError
    naming a missing component (`text_encoder_2/`).
    """
    _check_model_index(
        path_or_repo_id, revision=revision, pipelines=(IMG2IMG_PIPELINE, BASE_PIPELINE, INPAINT_PIPELINE), refiner=True
    )
    unet = read_component_config(SDXL_UNET_FORMAT, path_or_repo_id, revision=revision)
    text_encoder_2 = read_component_config(SDXL_TEXT_ENCODER_2_FORMAT, path_or_repo_id, revision=revision)
    check_sdxl_refiner_components(unet, text_encoder_2)
    return SDXLRefinerFolder(
        unet,
        text_encoder_2,
        _solver_defaults(path_or_repo_id, revision=revision),
        read_clip_tokenizer(path_or_repo_id, sequence_length=text_encoder_2.max_sequence_length, revision=revision),
    )


def check_sdxl_refiner_components(unet: UNetConfig, text_encoder_2: CLIPTextEncoderConfig) -> None:
    """Raise ValueError, naming the components and both widths, when an SDXL refiner UNet and its text encoder (CLIP-G)
    do not fit each other: the UNet must have the `text_time` added embedding, attend to CLIP-G's hidden states
    alone, and take its pooled embedding with five time ids (the aesthetic score's)."""
    _check_text_time(unet, "not an SDXL refiner UNet")
    if unet.cross_attention_dim != text_encoder_2.embedding_dim:
        raise ValueError(
            f"unet attends to {unet.cross_attention_dim}-wide text (cross_attention_dim) but text_encoder_2 gives "
            f"{text_encoder_2.embedding_dim}: an SDXL refiner attends to CLIP-G alone"
        )
    _check_added_embedding(unet, text_encoder_2, REFINER_TIME_IDS)


def check_sdxl_components(
    unet: UNetConfig, text_encoder: CLIPTextEncoderConfig, text_encoder_2: CLIPTextEncoderConfig
) -> None:
    """Raise ValueError, naming the components and both widths, when an SDXL base UNet and its two text encoders do
    not fit each other: the UNet must have the `text_time` added embedding, attend to both encoders' hidden states
    side by side, and take the second encoder's pooled embedding with six time ids."""
    _check_text_time(unet, "an SD1.5 UNet, not SDXL's; load this model with StableDiffusion_1")
    width = text_encoder.embedding_dim + text_encoder_2.embedding_dim
    if unet.cross_attention_dim != width:
        raise ValueError(
            f"unet attends to {unet.cross_attention_dim}-wide text (cross_attention_dim) but text_encoder "
            f"({text_encoder.embedding_dim}) and text_encoder_2 ({text_encoder_2.embedding_dim}) give {width}"
        )
    _check_added_embedding(unet, text_encoder_2, TIME_IDS)


def _check_text_time(unet: UNetConfig, kind: str) -> None:
    if unet.addition_embed_type != "text_time" or unet.addition_time_embed_dim is None:
        raise ValueError(
            f"unet: no 'text_time' added embedding (addition_embed_type={unet.addition_embed_type!r}): {kind}"
        )


def _check_added_embedding(unet: UNetConfig, text_encoder_2: CLIPTextEncoderConfig, time_ids: int) -> None:
    """The added embedding takes text_encoder_2's pooled embedding and `time_ids` time ids (6: the base's, 5: the
    refiner's); the error says when the UNet fits the other model's."""
    assert unet.addition_time_embed_dim is not None  # checked by _check_text_time
    taken, time_id_dim = unet.projection_class_embeddings_input_dim, unet.addition_time_embed_dim
    pooled = text_encoder_2.projection_dim or text_encoder_2.embedding_dim
    if taken == pooled + time_ids * time_id_dim:
        return
    other_time_ids, other = (
        (REFINER_TIME_IDS, "an SDXL refiner") if time_ids == TIME_IDS else (TIME_IDS, "an SDXL base")
    )
    hint = (
        f" ({other} UNet, which takes {other_time_ids} time ids)"
        if taken == pooled + other_time_ids * time_id_dim
        else ""
    )
    raise ValueError(
        f"unet's added embedding takes {taken} features (projection_class_embeddings_input_dim) but text_encoder_2's "
        f"pooled embedding ({pooled}) and {time_ids} time ids of {time_id_dim} give {pooled + time_ids * time_id_dim}"
        + hint
    )


def index_has_text_encoder(index: dict[str, Any]) -> bool:
    """Whether a diffusers `model_index.json` (read as `index`) gives a `text_encoder` (CLIP-L): an SDXL base model
    does, the refiner's gives `[null, null]`."""
    text_encoder = index.get("text_encoder")
    return not isinstance(text_encoder, list) or any(text_encoder)  # pyright: ignore[reportUnknownArgumentType]


def _check_model_index(
    path_or_repo_id: PathOrRepoId, *, revision: str | None, pipelines: tuple[str, ...], refiner: bool
) -> None:
    try:
        path = resolve_path(path_or_repo_id, "model_index.json", revision=revision)
    except FileNotFoundError:
        return  # a folder of components without the pipeline's index: the components' configs are checked
    index = read_json_object(path)
    pipeline = index.get("_class_name")
    if isinstance(pipeline, str) and pipeline.startswith("StableDiffusionXL"):
        has_text_encoder = index_has_text_encoder(index)
        if refiner and has_text_encoder:
            raise ValueError(
                f"{path}: a {pipeline} with a text_encoder (CLIP-L): an SDXL base model, not a refiner (load it "
                "with StableDiffusion_XL)"
            )
        if not refiner and not has_text_encoder:
            raise ValueError(
                f"{path}: a {pipeline} without text_encoder (CLIP-L): an SDXL refiner, not a base model (load it "
                "with StableDiffusion_XL_Refiner)"
            )
        if pipeline.startswith(pipelines):
            return
    kinds = {
        "StableDiffusionPipeline": " (Stable Diffusion 1.5: load it with StableDiffusion_1)",
        INPAINT_PIPELINE: " (SDXL inpainting: load it with StableDiffusion_XL_Inpainting)",
    }
    kind = kinds.get(pipeline, "") if isinstance(pipeline, str) else ""
    expected = " or ".join(repr(name) for name in pipelines)
    raise ValueError(f"{path}: _class_name is {pipeline!r}{kind}, expected {expected}")


def _solver_defaults(path_or_repo_id: PathOrRepoId, *, revision: str | None) -> dict[str, Any]:
    scheduler = read_scheduler_config(path_or_repo_id, revision=revision)
    if scheduler is None:
        return dict(SCHEDULER_DEFAULTS)
    path, config = scheduler
    beta_schedule = config.get("beta_schedule", "scaled_linear")
    if beta_schedule not in ("scaled_linear", "linear"):
        raise ValueError(f"{path}: beta_schedule is {beta_schedule!r}, our solvers use 'scaled_linear' or 'linear'")
    prediction_type = scheduler_prediction_type(path, config)
    defaults = {key: config.get(key, default) for key, default in _DIFFUSERS_SCHEDULER_DEFAULTS.items()}
    return {**defaults, "noise_schedule": beta_schedule, "prediction_type": prediction_type}
