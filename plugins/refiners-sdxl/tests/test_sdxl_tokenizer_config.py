"""CLIP-G's tokenizer read from an SDXL folder's `tokenizer_2/` (`refiners_sdxl.tokenizer_config.read_clip_tokenizer`)
rather than assumed: the published config (pad `!`, id 0, 77 ids), another pad token it names, and the one-line errors,
naming the file and the field, for a tokenizer ours does not reproduce; then through `StableDiffusion_XL` and
`StableDiffusion_XL_Refiner.from_pretrained` on small random folders (`refiners_sdxl.testing`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from refiners_sd15.clip import CLIPTextEncoderG
from refiners_sdxl import StableDiffusion_XL, StableDiffusion_XL_Refiner
from refiners_sdxl.testing import SDXL_TOKENIZER_2_CONFIG, write_small_sdxl_folder, write_small_sdxl_refiner_folder
from refiners_sdxl.tokenizer_config import read_clip_tokenizer

END_OF_TEXT = 49407


def write_tokenizer_2(folder: Path, config: dict[str, Any], special_tokens: dict[str, Any] | None = None) -> Path:
    (folder / "tokenizer_2").mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(config))
    if special_tokens is not None:
        (folder / "tokenizer_2" / "special_tokens_map.json").write_text(json.dumps(special_tokens))
    return folder / "tokenizer_2"


def test_the_published_tokenizer_2_pads_with_exclamation_mark_id_0(tmp_path: Path) -> None:
    write_tokenizer_2(tmp_path, SDXL_TOKENIZER_2_CONFIG)

    tokenizer = read_clip_tokenizer(tmp_path, sequence_length=77)

    assert tokenizer is not None
    assert (tokenizer.pad_token_id, tokenizer.sequence_length) == (0, 77)
    assert tokenizer("a cat")[0, 4:].tolist() == [0] * 73  # start, "a", "cat", end, then "!"s


def test_a_pad_token_given_only_by_special_tokens_map_is_read_from_there(tmp_path: Path) -> None:
    config = {key: value for key, value in SDXL_TOKENIZER_2_CONFIG.items() if key != "pad_token"}
    write_tokenizer_2(tmp_path, config, {"pad_token": {"content": "<|endoftext|>", "lstrip": False}})

    tokenizer = read_clip_tokenizer(tmp_path, sequence_length=77)

    assert tokenizer is not None and tokenizer.pad_token_id == END_OF_TEXT


def test_a_folder_without_tokenizer_2_gives_none(tmp_path: Path) -> None:
    assert read_clip_tokenizer(tmp_path, sequence_length=77) is None


@pytest.mark.parametrize(
    ("changes", "field", "message"),
    [
        ({"tokenizer_class": "T5Tokenizer"}, "tokenizer_class", "tokenizer_class is 'T5Tokenizer', refiners-sdxl "
         "reproduces CLIPTokenizer or CLIPTokenizerFast"),
        ({"do_lower_case": False}, "do_lower_case", "do_lower_case is False, CLIP's tokenizer lowercases (true)"),
        ({"model_max_length": 64}, "model_max_length", "model_max_length is 64, the text encoder reads sequences of "
         "77 ids (max_position_embeddings)"),
        ({"pad_token": "<pad>"}, "pad_token", "pad_token '<pad>' is not in CLIP's vocabulary"),
        ({"pad_token": {"lstrip": False}}, "pad_token", "pad_token must be a string or an object with a 'content' "
         "string, got {'lstrip': False}"),
        ({"pad_token": None}, "pad_token", "no pad_token, and no special_tokens_map.json beside it gives one"),
    ],
)  # fmt: skip
def test_a_tokenizer_2_ours_does_not_reproduce_is_an_error_naming_the_file_and_field(
    tmp_path: Path, changes: dict[str, Any], field: str, message: str
) -> None:
    folder = write_tokenizer_2(tmp_path, {**SDXL_TOKENIZER_2_CONFIG, **changes})

    with pytest.raises(ValueError) as caught:
        read_clip_tokenizer(tmp_path, sequence_length=77)

    assert str(caught.value) == f"{folder / 'tokenizer_config.json'}: {message}"
    assert field in str(caught.value)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tokenizer_2")
    return write_small_sdxl_folder(root / "base"), write_small_sdxl_refiner_folder(root / "refiner")


@torch.no_grad()
def test_base_and_refiner_use_the_pad_token_their_tokenizer_2_names(folders: tuple[Path, Path], tmp_path: Path) -> None:
    for folder, load in zip(folders, (StableDiffusion_XL.from_pretrained, StableDiffusion_XL_Refiner.from_pretrained)):
        copy = tmp_path / folder.name
        shutil.copytree(folder, copy)
        write_tokenizer_2(copy, {**SDXL_TOKENIZER_2_CONFIG, "pad_token": "<|endoftext|>"})

        published, other = load(folder), load(copy)

        (embedding, _), (other_embedding, _) = (
            published.compute_clip_text_embedding("a cat"),
            (other.compute_clip_text_embedding("a cat")),
        )
        encoder_g, published_g = (
            model.clip_text_encoder
            if isinstance(model.clip_text_encoder, CLIPTextEncoderG)
            else model.clip_text_encoder.text_encoder_g
            for model in (other, published)
        )
        assert (encoder_g.tokenizer.pad_token_id, published_g.tokenizer.pad_token_id) == (END_OF_TEXT, 0)
        assert [type(layer) for layer in encoder_g] == [type(layer) for layer in published_g]  # no layer added
        assert not torch.allclose(embedding, other_embedding)  # the pad token reaches the text embedding


def test_a_bad_tokenizer_2_is_refused_before_any_weight_is_read(
    folders: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for folder, model in zip(folders, (StableDiffusion_XL, StableDiffusion_XL_Refiner)):
        copy = tmp_path / folder.name
        shutil.copytree(folder, copy)
        config = (
            write_tokenizer_2(copy, {**SDXL_TOKENIZER_2_CONFIG, "model_max_length": 1024}) / "tokenizer_config.json"
        )

        with pytest.raises(ValueError, match=f"^{config}: model_max_length is 1024, the text encoder reads"):
            model.from_pretrained(copy)
