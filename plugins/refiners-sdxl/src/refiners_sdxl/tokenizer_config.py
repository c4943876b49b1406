"""Read CLIP-G's tokenizer settings from an SDXL folder's `tokenizer_2/` (`tokenizer_config.json`, and
`special_tokens_map.json` for a pad token it leaves out) instead of assuming the published ones, and refuse a tokenizer
that ours (refiners-sd15's `CLIPTokenizer`, CLIP's vocabulary) would not reproduce."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from refiners_core.weights import resolve_path
from refiners_sd15.clip import CLIPTokenizer
from refiners_sd15.loading import PathOrRepoId, read_json_object

TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
"""The `tokenizer_class` values of a `tokenizer_config.json` whose tokenizer ours reproduces."""


def read_clip_tokenizer(
    path_or_repo_id: PathOrRepoId, *, sequence_length: int, subfolder: str = "tokenizer_2", revision: str | None = None
) -> CLIPTokenizer | None:
    """The tokenizer `subfolder/tokenizer_config.json` of a diffusers folder or hub id describes (its `pad_token`, or
    `special_tokens_map.json`'s, as transformers reads them; its `model_max_length`), or None when there is no such
    file (the text encoder's default then: SDXL's published `!`, id 0, for CLIP-G).

    Raises ValueError naming the file and the field for a tokenizer ours does not reproduce: a `tokenizer_class` not
    in `TOKENIZER_CLASSES`, `do_lower_case` false, a `pad_token` that is not in CLIP's vocabulary (or no pad token at
    all), a `model_max_length` other than `sequence_length` (the text encoder's positions).
    """
    try:
        path = resolve_path(path_or_repo_id, "tokenizer_config.json", subfolder=subfolder, revision=revision)
    except FileNotFoundError:
        return None
    config = read_json_object(path)
    tokenizer_class = config.get("tokenizer_class", TOKENIZER_CLASSES[0])
    if tokenizer_class not in TOKENIZER_CLASSES:
        raise ValueError(
            f"{path}: tokenizer_class is {tokenizer_class!r}, refiners-sdxl reproduces {' or '.join(TOKENIZER_CLASSES)}"
        )
    if config.get("do_lower_case", True) is not True:
        raise ValueError(f"{path}: do_lower_case is {config['do_lower_case']!r}, CLIP's tokenizer lowercases (true)")
    length = config.get("model_max_length")
    if length != sequence_length:
        raise ValueError(
            f"{path}: model_max_length is {length!r}, the text encoder reads sequences of {sequence_length} ids "
            "(max_position_embeddings)"
        )
    pad_token, source = _pad_token(config, path, path_or_repo_id, subfolder=subfolder, revision=revision)
    tokenizer = CLIPTokenizer(sequence_length=sequence_length)
    pad_token_id = tokenizer.token_to_id(pad_token)
    if pad_token_id is None:
        raise ValueError(f"{source}: pad_token {pad_token!r} is not in CLIP's vocabulary")
    if pad_token_id == tokenizer.pad_token_id:
        return tokenizer
    return CLIPTokenizer(sequence_length=sequence_length, pad_token_id=pad_token_id)


def _pad_token(
    config: dict[str, Any], path: Path, path_or_repo_id: PathOrRepoId, *, subfolder: str, revision: str | None
) -> tuple[str, Path]:
    """The pad token's text and the file that gives it: `tokenizer_config.json`, else `special_tokens_map.json`."""
    if config.get("pad_token") is not None:
        return _token_text(config["pad_token"], path), path
    try:
        special = resolve_path(path_or_repo_id, "special_tokens_map.json", subfolder=subfolder, revision=revision)
    except FileNotFoundError:
        raise ValueError(f"{path}: no pad_token, and no special_tokens_map.json beside it gives one") from None
    token = read_json_object(special).get("pad_token")
    if token is None:
        raise ValueError(f"{path} and {special}: no pad_token")
    return _token_text(token, special), special


def _token_text(token: object, path: Path) -> str:
    """A special token as transformers writes it: its text, or `{"content": text, ...}`."""
    content = token.get("content") if isinstance(token, dict) else token  # pyright: ignore[reportUnknownMemberType, reportUnknownVariableType]
    if not isinstance(content, str):
        raise ValueError(f"{path}: pad_token must be a string or an object with a 'content' string, got {token!r}")
    return content
