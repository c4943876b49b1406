"""Read textual inversion embedding files: AUTOMATIC1111 `.pt`/`.safetensors` and diffusers `learned_embeds`.

Formats, all holding one `(vectors, dim)` (or `(dim,)`) tensor:

- AUTOMATIC1111 `.pt` (also `.bin`): a pickled dict whose `string_to_param` maps `"*"` to the vectors, and whose
  `name` is the embedding's name. Read with `torch.load(weights_only=True)`, which refuses pickles that run code.
- AUTOMATIC1111 / kohya `.safetensors`: the vectors under `emb_params`, no name (the file's stem is used).
- diffusers `learned_embeds.safetensors` (or `.bin`): `{token: vectors}`, the token being the name.

SDXL embeddings hold one tensor per text encoder: `clip_l` `(vectors, 768)` for CLIP-L and `clip_g` `(vectors, 1280)`
for CLIP-G (A1111 / kohya `.safetensors`), read by `read_sdxl_embedding`; the file's stem is the name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard, cast

import torch
from safetensors.torch import load_file  # pyright: ignore[reportUnknownVariableType]

from refiners_core.checks import sniff_weights_format
from refiners_core.weights import WeightsError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
MAX_EMBEDDING_BYTES = 64 * 2**20
"""The largest embedding file read: embeddings hold a few vectors (kilobytes); a bigger file is something else."""


@dataclass(frozen=True)
class Embedding:
    """The vectors of one textual inversion embedding, `(vectors, dim)`, and the name its file gives it."""

    name: str
    vectors: torch.Tensor
    source: str
    """Where it comes from (the file path), for error messages."""


SDXL_KEYS = ("clip_l", "clip_g")
"""The keys of an SDXL embedding file: the vectors for CLIP-L (the first text encoder) and CLIP-G (the second)."""


@dataclass(frozen=True)
class SDXLEmbedding:
    """The vectors of one SDXL textual inversion embedding, for each text encoder, and the name its file gives it."""

    name: str
    clip_l: torch.Tensor
    """`(vectors, dim)` for CLIP-L."""
    clip_g: torch.Tensor
    """`(vectors, dim)` for CLIP-G."""
    source: str
    """Where it comes from (the file path), for error messages."""


def read_embedding(path: str | os.PathLike[str]) -> Embedding:
    """The embedding stored in an A1111 `.pt`/`.safetensors` or a diffusers `learned_embeds` file (SD1.5's).

    Raises FileNotFoundError if there is no such file, and WeightsError (a ValueError) naming the file when it
    cannot be read, is larger than `MAX_EMBEDDING_BYTES`, holds an SDXL embedding (`clip_l` and `clip_g`), or holds
    something else than one finite embedding (say, a LoRA, a model, or vectors with NaN or infinite values).
    """
    embedding = read_any_embedding(path)
    if isinstance(embedding, SDXLEmbedding):
        raise WeightsError(
            f"{path} is an SDXL embedding ('clip_l' and 'clip_g' vectors, for SDXL's two text encoders), not one for "
            "a single text encoder such as SD1.5's: load it on an SDXL model (SDXLTextualInversion)"
        )
    return embedding


def read_sdxl_embedding(path: str | os.PathLike[str]) -> SDXLEmbedding:
    """The SDXL embedding (`clip_l` and `clip_g` vectors) stored in a `.safetensors` or torch file.

    Raises FileNotFoundError if there is no such file, and WeightsError (a ValueError) naming the file when it cannot
    be read, holds a single-encoder (SD1.5) embedding, lacks `clip_l` or `clip_g`, or holds something else than
    finite vectors.
    """
    embedding = read_any_embedding(path)
    if isinstance(embedding, Embedding):
        raise WeightsError(
            f"{path} holds one embedding, for a single text encoder such as SD1.5's, not an SDXL embedding (which "
            "has 'clip_l' and 'clip_g' vectors for SDXL's two text encoders): load it on an SD1.5 model"
        )
    return embedding


def read_any_embedding(path: str | os.PathLike[str]) -> Embedding | SDXLEmbedding:
    """The embedding a file holds: an `SDXLEmbedding` for a file with `clip_l` and `clip_g` vectors, else an
    `Embedding` (A1111 `.pt`/`.safetensors`, diffusers `learned_embeds`). Raises as `read_embedding` and
    `read_sdxl_embedding` do for any other content."""
    path = Path(path)
    content = _read_file(path)
    if _is_dict(content) and any(key in content for key in SDXL_KEYS):
        missing = [key for key in SDXL_KEYS if key not in content]
        if missing:
            raise WeightsError(
                f"{path}: an SDXL embedding needs both 'clip_l' and 'clip_g' vectors, '{missing[0]}' is missing"
            )
        clip_l, clip_g = (_as_matrix(content[key], f"{path}: the embedding '{key}'") for key in SDXL_KEYS)
        return SDXLEmbedding(name=path.stem, clip_l=clip_l, clip_g=clip_g, source=str(path))
    name, key, vectors = _name_key_and_vectors(content, path)
    return Embedding(name=name, vectors=_as_matrix(vectors, f"{path}: the embedding {key}"), source=str(path))


def _read_file(path: Path) -> object:
    """What an embedding file holds (tensors, or a dict of them), after the checks of size, extension and format."""
    if not path.is_file():
        raise FileNotFoundError(f"no textual inversion embedding file at {path}")
    size = path.stat().st_size
    if size > MAX_EMBEDDING_BYTES:
        raise WeightsError(
            f"{path} is {size / 2**20:.0f} MiB: an embedding file holds a few vectors (at most "
            f"{MAX_EMBEDDING_BYTES // 2**20} MiB read), is it a model or a LoRA?"
        )
    known = (".safetensors", *TORCH_SUFFIXES)
    if path.suffix.lower() not in known:
        raise WeightsError(
            f"cannot read {path}: unknown embedding file extension {path.suffix!r} (expected {', '.join(known)})"
        )
    kind = sniff_weights_format(path)  # by content: a safetensors file named .pt is read as what it is
    if kind == "git-lfs":
        raise WeightsError(f"{path} is a git-lfs pointer, not the embedding it stands for: run `git lfs pull`")
    if kind == "safetensors":
        try:
            content: object = load_file(path)
        except Exception as error:
            raise WeightsError(f"cannot read {path} as safetensors: {error}") from error
    elif kind in ("torch-zip", "torch-legacy"):
        try:
            with open(path, "rb") as file:  # a file object: torch.load routes a `.safetensors` path by its name
                content = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:
            raise WeightsError(
                f"cannot read {path} as a torch file of tensors: {' '.join(str(error).split())}"
            ) from error
    else:
        what = "empty" if size == 0 else "neither a safetensors file nor a torch file (by its first bytes)"
        raise WeightsError(f"cannot read {path}: it is {what}")
    return content


def _is_dict(content: object) -> TypeGuard[dict[Any, Any]]:
    """Whether `content` is a dict, its keys and values (a file's, not checked yet) of any type."""
    return isinstance(content, dict)


def _name_key_and_vectors(content: object, path: Path) -> tuple[str, str, object]:
    """The embedding's name, where the file keeps its vectors (for messages) and the vectors."""
    if isinstance(content, torch.Tensor):
        return path.stem, "tensor", content
    if not isinstance(content, dict):
        raise WeightsError(f"{path} holds a {type(content).__name__}, not a textual inversion embedding")
    entries = cast(dict[Any, Any], content)
    if "string_to_param" in entries:
        parameters = entries["string_to_param"]
        if not isinstance(parameters, dict) or "*" not in parameters:
            raise WeightsError(f"{path}: 'string_to_param' has no '*' entry (not an A1111 embedding)")
        name = entries.get("name")
        name = name if isinstance(name, str) and name else path.stem
        return name, "string_to_param['*']", cast(dict[Any, Any], parameters)["*"]
    if "emb_params" in entries:
        return path.stem, "'emb_params'", entries["emb_params"]
    if len(entries) == 1:
        ((token, vectors),) = entries.items()
        if isinstance(token, str):
            return token, repr(token), vectors
    keys = ", ".join(repr(key) for key in list(entries)[:5]) + (", ..." if len(entries) > 5 else "")
    raise WeightsError(
        f"{path} is not a textual inversion embedding: expected 'string_to_param' (A1111 .pt), 'emb_params' "
        f"(A1111 .safetensors) or a single {{token: tensor}} entry (diffusers), found keys {keys}"
    )


def _as_matrix(vectors: object, what: str) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or not vectors.is_floating_point():
        kind = f"a {vectors.dtype} tensor" if isinstance(vectors, torch.Tensor) else type(vectors).__name__
        raise WeightsError(f"{what} is {kind}, expected a floating point tensor")
    if vectors.dim() == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise WeightsError(f"{what} has shape {tuple(vectors.shape)}, expected (vectors, dim) with at least one vector")
    finite = torch.isfinite(vectors)
    if not bool(finite.all()):
        bad = sorted({int(row) for row in (~finite).nonzero()[:, 0]})
        listed = ", ".join(str(row) for row in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise WeightsError(f"{what} has {int((~finite).sum())} NaN or infinite values (in vectors {listed})")
    return vectors
