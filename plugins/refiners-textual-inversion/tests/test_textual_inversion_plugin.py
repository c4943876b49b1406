"""The installed plugin: its registry entries and its `--embedding` option of `refiners generate`."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from refiners_core.plugins import registry
from refiners_sd15.clip import CLIPTextEncoderConfig, CLIPTextEncoderL
from refiners_textual_inversion import TextualInversionAdapter
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
