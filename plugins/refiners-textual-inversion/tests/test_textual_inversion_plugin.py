"""The installed plugin: its registry entries and its `--embedding` option of `refiners generate`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from refiners_core.plugins import registry
from refiners_sd15.clip import CLIPTextEncoderConfig, CLIPTextEncoderL
from refiners_textual_inversion import TextualInversionAdapter
from refiners_textual_inversion.files import read_embedding
from refiners_textual_inversion.options import apply_embedding_option, parse_embedding_value


def small_encoder() -> CLIPTextEncoderL:
    torch.manual_seed(0)
    config = CLIPTextEncoderConfig(embedding_dim=32, num_layers=1, num_attention_heads=4, feedforward_dim=64)
    return CLIPTextEncoderL(config).eval()


def test_plugin_registers_the_adapter_and_the_generate_option() -> None:
    loaded = registry(reload=True)
    (record,) = [record for record in loaded.plugins if record.distribution == "refiners-textual-inversion"]
    assert record.status == "ok", record.error
    assert record.entry_point == "textual-inversion = refiners_textual_inversion.plugin"
    assert record.adapters == ("textual-inversion",)
    assert record.generate_options == ("--embedding",)
    assert record.to_json()["adapters"] == ["textual-inversion"]  # as `refiners plugins --json` shows it

    encoder = small_encoder()
    adapter = loaded.adapters["textual-inversion"].create(encoder)
    assert isinstance(adapter, TextualInversionAdapter)
    with pytest.raises(TypeError, match="cannot wrap a Linear"):
        loaded.adapters["textual-inversion"].create(torch.nn.Linear(2, 2))
    assert loaded.generate_options["--embedding"].applies_to("sd15")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("style.pt", ("style.pt", None)),
        ("style.pt:<my-style>", ("style.pt", "<my-style>")),
        ("folder:with:colons/style.pt", ("folder:with:colons/style.pt", None)),
        ("/embeddings/a:b/style.pt", ("/embeddings/a:b/style.pt", None)),
        ("C:\\embeddings\\style.pt", ("C:\\embeddings\\style.pt", None)),
        ("C:\\embeddings\\style.pt:tok", ("C:\\embeddings\\style.pt", "tok")),
    ],
)
def test_embedding_option_values_are_a_file_and_an_optional_token(value: str, expected: tuple[str, str | None]) -> None:
    assert parse_embedding_value(value) == expected


def test_embedding_option_value_naming_an_existing_file_is_that_file(tmp_path: Path) -> None:
    path = tmp_path / "style:v2.pt"
    path.write_bytes(b"")
    assert parse_embedding_value(str(path)) == (str(path), None)


def test_embedding_option_loads_every_file_into_the_text_encoder(tmp_path: Path) -> None:
    save_file({"<cat-toy>": torch.randn(2, 32)}, tmp_path / "learned_embeds.safetensors")
    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "my-style.safetensors")
    model = SimpleNamespace(clip_text_encoder=small_encoder())
    before = model.clip_text_encoder("<toy> in my-style")

    apply_embedding_option(
        model, [f"{tmp_path / 'learned_embeds.safetensors'}:<toy>", str(tmp_path / "my-style.safetensors")]
    )

    (adapter,) = model.clip_text_encoder.layers(TextualInversionAdapter)
    assert adapter.tokens == ("<toy>", "my-style")
    assert not torch.equal(model.clip_text_encoder("<toy> in my-style"), before)


def test_embedding_option_with_a_bad_file_names_it_and_leaves_the_model_unchanged(tmp_path: Path) -> None:
    save_file({"<cat-toy>": torch.randn(2, 32)}, tmp_path / "learned_embeds.safetensors")
    model = SimpleNamespace(clip_text_encoder=small_encoder())
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        apply_embedding_option(model, [str(tmp_path / "learned_embeds.safetensors"), str(tmp_path / "missing.pt")])
    assert not list(model.clip_text_encoder.layers(TextualInversionAdapter))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            {"emb_params": torch.tensor([[1.0, float("nan")] * 16])},
            "'emb_params' has 16 NaN or infinite values \\(in vectors 0\\)",
        ),
        (
            {"emb_params": torch.full((3, 32), float("inf"))},
            "'emb_params' has 96 NaN or infinite values \\(in vectors 0, 1, 2\\)",
        ),
        (
            {"<tok>": torch.tensor([[0.0] * 32, [float("-inf")] * 32])},
            "'<tok>' has 32 NaN or infinite values \\(in vectors 1\\)",
        ),
        (
            {"string_to_param": {"*": torch.full((7, 32), float("nan"))}, "name": "cat"},
            "string_to_param\\['\\*'\\] has 224 NaN or infinite values \\(in vectors 0, 1, 2, 3, 4, ...\\)",
        ),
    ],
)
def test_embedding_with_nan_or_infinite_values_is_refused_naming_the_file(
    tmp_path: Path, content: dict[str, Any], message: str
) -> None:
    path = tmp_path / ("bad.pt" if "string_to_param" in content else "bad.safetensors")
    if "string_to_param" in content:
        torch.save(content, path)
    else:
        save_file(content, path)
    validate = registry().generate_options["--embedding"].validate
    assert validate is not None
    with pytest.raises(ValueError, match=f"{path.name}: the embedding {message}"):
        validate([str(path)])
    model = SimpleNamespace(clip_text_encoder=small_encoder())
    with pytest.raises(ValueError, match=message):
        apply_embedding_option(model, [str(path)])
    assert not list(model.clip_text_encoder.layers(TextualInversionAdapter))


def test_embedding_option_is_validated_before_the_model_is_loaded(tmp_path: Path) -> None:
    save_file({"emb_params": torch.randn(1, 32)}, tmp_path / "style.safetensors")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    validate = registry().generate_options["--embedding"].validate
    assert validate is not None
    validate([str(tmp_path / "style.safetensors"), f"{tmp_path / 'style.safetensors'}:other"])
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        validate([str(tmp_path / "missing.pt")])
    with pytest.raises(ValueError, match="text.pt"):
        validate([str(tmp_path / "text.pt")])
    with pytest.raises(ValueError, match="the token 'style' is already given"):
        validate([str(tmp_path / "style.safetensors"), str(tmp_path / "style.safetensors")])
    with open(tmp_path / "model.safetensors", "wb") as file:
        file.truncate(65 * 2**20)  # sparse: nothing is written, nothing may be read
    with pytest.raises(ValueError, match="model.safetensors is 65 MiB: an embedding file holds a few vectors"):
        validate([str(tmp_path / "model.safetensors")])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_vectors_that_are_not_finite_are_refused_and_change_nothing(bad: float) -> None:
    encoder = small_encoder()
    adapter = TextualInversionAdapter(encoder)
    vectors = torch.randn(2, 32)
    vectors[1, 5] = bad
    with pytest.raises(ValueError, match="textual inversion tensor \\(token '<cat>'\\): the vectors has"):
        adapter.add_embedding("<cat>", vectors)
    assert adapter.tokens == () and adapter.new_embeddings.num_embeddings == 0


def test_embedding_files_are_read_by_their_content_not_their_extension(tmp_path: Path) -> None:
    vectors = torch.randn(2, 32)
    save_file({"emb_params": vectors}, tmp_path / "style.safetensors")
    (tmp_path / "renamed.pt").write_bytes((tmp_path / "style.safetensors").read_bytes())
    torch.save({"string_to_param": {"*": vectors}, "name": "zip"}, tmp_path / "zipped.safetensors")
    (tmp_path / "pointer.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert torch.equal(read_embedding(tmp_path / "renamed.pt").vectors, vectors)
    assert torch.equal(read_embedding(tmp_path / "zipped.safetensors").vectors, vectors)
    with pytest.raises(ValueError, match="pointer.pt is a git-lfs pointer, not the embedding it stands for"):
        read_embedding(tmp_path / "pointer.pt")
    with pytest.raises(ValueError, match="empty.pt: it is empty"):
        read_embedding(tmp_path / "empty.pt")
