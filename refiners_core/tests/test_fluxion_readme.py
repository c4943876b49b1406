"""The README's first two examples (the toy ViT and its Context API variant) run on refiners_core.fluxion.

The full-size model (the README's `ViT(embedding_dim=768, image_size=224, num_heads=12)`) is built for the
shape and parameter-count checks; parity runs on a reduced configuration of the same classes to keep CPU runs
fast. Parity tolerance: atol 1e-5 in float32 against `refiners_core.testing.readme_vit.TorchViT`, a plain
`torch.nn` implementation (`nn.MultiheadAttention`) of the same architecture holding the same weights.
"""

import pytest
import torch

import refiners_core.fluxion as fl
from refiners_core.testing.readme_vit import CrossAttentionViT, TorchViT, ViT, copy_weights, vit_parameter_count

IMAGE = (2, 3, 224, 224)
SMALL = {"embedding_dim": 96, "patch_size": 16, "image_size": 64, "num_layers": 3, "num_heads": 6}


@pytest.fixture(scope="module")
def vit() -> ViT:
    torch.manual_seed(0)
    return ViT(embedding_dim=768, image_size=224, num_heads=12)  # ~ViT-B/16 like


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(*IMAGE)


@pytest.fixture(scope="module")
def small_image() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 64, 64)


@pytest.fixture(scope="module")
def cross_vit() -> CrossAttentionViT:
    torch.manual_seed(2)
    return CrossAttentionViT(**SMALL)


def test_readme_vit_outputs_one_embedding_per_patch_on_the_patch_grid(vit: ViT, image: torch.Tensor) -> None:
    with torch.no_grad():
        y = vit(image)
    assert y.shape == (2, 768, 14, 14)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_readme_vit_parameter_count_matches_its_architecture(vit: ViT) -> None:
    expected = vit_parameter_count(embedding_dim=768, patch_size=16, image_size=224, num_layers=12)
    assert expected == 142_464_768  # ViT-B/16 is 86M; this toy has one extra 768-3072-768 MLP per block
    assert sum(p.numel() for p in vit.parameters()) == expected


def test_readme_vit_prints_as_a_folded_tree_with_names_and_sizes(vit: ViT) -> None:
    text = repr(vit)
    lines = text.splitlines()
    assert lines[0].startswith("ViT(embedding_dim=768, image_size=224, num_heads=12)  [")  # the arguments given
    assert "142.5M parameters" in lines[0]
    assert "(Chain_1 … Chain_12) Chain() ×12" in text
    assert "(Linear_1 … Linear_3) Linear(in_features=768, out_features=768) ×3" in text
    assert "(Linear_1) Linear(in_features=768, out_features=3072)" in text
    assert "Attention(embedding_dim=768, num_heads=12)" in text
    assert "Parameter(dims=(196, 768))" in text
    assert "(Reshape_2) Reshape(shape=(768, 14, 14))" in text
    assert len(lines) < 30


def test_readme_vit_has_the_documented_layer_paths(vit: ViT) -> None:
    query = vit["Chain_1.Residual_1.Attention.Distribute.Linear_1"]
    assert isinstance(query, fl.Linear)
    assert query.get_path() == "ViT.Chain_1.Residual_1.Attention.Distribute.Linear_1"
    assert len(list(vit.layers(fl.Attention))) == 12


def test_readme_vit_matches_a_plain_torch_vit_with_the_same_weights(small_image: torch.Tensor) -> None:
    torch.manual_seed(3)
    vit = ViT(**SMALL)
    reference = TorchViT(**SMALL)
    copy_weights(vit, reference)
    with torch.no_grad():
        expected = reference(small_image)
        y = vit(small_image)
    assert y.abs().max() > 0.1  # the comparison below is not between two near-zero tensors
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_readme_cross_attention_vit_matches_plain_torch_cross_attention(
    cross_vit: CrossAttentionViT, small_image: torch.Tensor
) -> None:
    embed = torch.randn(2, 7, 96)  # a context sequence of another length than the 16 patches
    cross_vit.set_context("cross_attention", {"my_embed": embed})
    reference = TorchViT(**SMALL)
    copy_weights(cross_vit, reference)
    with torch.no_grad():
        expected = reference(small_image, key_value=embed)
        y = cross_vit(small_image)
    assert y.shape == (2, 96, 4, 4)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)


def test_readme_cross_attention_vit_output_follows_the_context(
    cross_vit: CrossAttentionViT, small_image: torch.Tensor
) -> None:
    first, second = torch.randn(2, 16, 96), torch.randn(2, 16, 96)
    with torch.no_grad():
        cross_vit.set_context("cross_attention", {"my_embed": first})
        y_first = cross_vit(small_image)
        cross_vit.set_context("cross_attention", {"my_embed": second})
        y_second = cross_vit(small_image)
        cross_vit.set_context("cross_attention", {"my_embed": first})
        y_first_again = cross_vit(small_image)
    assert not torch.allclose(y_first, y_second)
    assert torch.equal(y_first, y_first_again)


@pytest.mark.parametrize(
    ("context", "quote"), [(None, ""), ({"other": (1, 16, 32)}, "'")], ids=["without context", "without context key"]
)
def test_readme_cross_attention_vit_missing_its_context_names_context_key_and_layer(
    context: dict[str, tuple[int, ...]] | None, quote: str
) -> None:
    model = CrossAttentionViT(embedding_dim=32, patch_size=8, image_size=32, num_layers=2, num_heads=4)
    if context is not None:
        model.set_context("cross_attention", {key: torch.randn(shape) for key, shape in context.items()})
    with pytest.raises(fl.ContextError) as info:
        model(torch.randn(1, 3, 32, 32))
    message = str(info.value)
    assert f"{quote}cross_attention{quote}" in message
    assert f"{quote}my_embed{quote}" in message
    assert "CrossAttentionViT.Chain_1.Residual_1.Parallel.UseContext_1" in message
