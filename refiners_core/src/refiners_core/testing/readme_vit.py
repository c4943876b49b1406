# pyright: basic
# (`ViT` and `CrossAttentionViT` are the README's code as written, without type hints.)
"""The toy ViT of the Refiners README, verbatim but for the import, and a plain-torch twin to check it against.

`ViT` is the README's first example; `CrossAttentionViT` is the same model with the README's Context API diff
applied (the key and value `Identity` layers replaced by `UseContext`). `TorchViT` computes the same function
with `torch.nn` layers only (`nn.MultiheadAttention` for attention); `copy_weights` fills it from a `ViT` by
explicit layer paths, so the two can be compared output for output. For the tests of the README's examples, in
refiners-core (Fluxion, the Context API) and in the plugins that adapt the model (refiners-lora's Adapter API).
"""

import torch
from torch import nn

import refiners_core.fluxion as fl


# fmt: off
class ViT(fl.Chain):
    def __init__(self, embedding_dim=512, patch_size=16, image_size=384, num_layers=12, num_heads=8):
        num_patches = (image_size // patch_size)
        super().__init__(
            fl.Conv2d(in_channels=3, out_channels=embedding_dim, kernel_size=patch_size, stride=patch_size),
            fl.Reshape(num_patches**2, embedding_dim),
            fl.Residual(fl.Parameter(num_patches**2, embedding_dim)),
            *(fl.Chain(
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(fl.Parallel(fl.Identity(), fl.Identity(), fl.Identity()),
                        fl.Attention(embedding_dim=embedding_dim, num_heads=num_heads, key_embedding_dim=embedding_dim, value_embedding_dim=embedding_dim)),  # noqa: E501
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(fl.Linear(embedding_dim, embedding_dim * 4), fl.GeLU(), fl.Linear(embedding_dim * 4, embedding_dim)),  # noqa: E501
                    fl.Chain(fl.Linear(embedding_dim, embedding_dim * 4), fl.GeLU(), fl.Linear(embedding_dim * 4, embedding_dim)),  # noqa: E501
                ) for _ in range(num_layers)),
            fl.Reshape(embedding_dim, num_patches, num_patches),
        )


class CrossAttentionViT(fl.Chain):
    def __init__(self, embedding_dim=512, patch_size=16, image_size=384, num_layers=12, num_heads=8):
        num_patches = (image_size // patch_size)
        super().__init__(
            fl.Conv2d(in_channels=3, out_channels=embedding_dim, kernel_size=patch_size, stride=patch_size),
            fl.Reshape(num_patches**2, embedding_dim),
            fl.Residual(fl.Parameter(num_patches**2, embedding_dim)),
            *(fl.Chain(
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Parallel(
                            fl.Identity(),
                            fl.UseContext(context="cross_attention", key="my_embed"),
                            fl.UseContext(context="cross_attention", key="my_embed"),
                        ),
                        fl.Attention(embedding_dim=embedding_dim, num_heads=num_heads, key_embedding_dim=embedding_dim, value_embedding_dim=embedding_dim)),  # noqa: E501
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(fl.Linear(embedding_dim, embedding_dim * 4), fl.GeLU(), fl.Linear(embedding_dim * 4, embedding_dim)),  # noqa: E501
                    fl.Chain(fl.Linear(embedding_dim, embedding_dim * 4), fl.GeLU(), fl.Linear(embedding_dim * 4, embedding_dim)),  # noqa: E501
                ) for _ in range(num_layers)),
            fl.Reshape(embedding_dim, num_patches, num_patches),
        )
# fmt: on


def vit_parameter_count(embedding_dim: int, patch_size: int, image_size: int, num_layers: int) -> int:
    """The number of parameters of the README ViT, from its architecture."""
    e = embedding_dim
    patches = (image_size // patch_size) ** 2
    patch_embedding = 3 * e * patch_size**2 + e
    position = patches * e
    layer_norms = 2 * (e + e)
    attention = 4 * (e * e + e)
    mlp = (e * 4 * e + 4 * e) + (4 * e * e + e)
    return patch_embedding + position + num_layers * (layer_norms + attention + 2 * mlp)


class TorchBlock(nn.Module):
    def __init__(self, embedding_dim: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.attention = nn.MultiheadAttention(embedding_dim, num_heads, batch_first=True)
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp_residual = nn.Sequential(
            nn.Linear(embedding_dim, 4 * embedding_dim), nn.GELU(), nn.Linear(4 * embedding_dim, embedding_dim)
        )
        self.mlp = nn.Sequential(
            nn.Linear(embedding_dim, 4 * embedding_dim), nn.GELU(), nn.Linear(4 * embedding_dim, embedding_dim)
        )

    def forward(self, x: torch.Tensor, key_value: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x)
        kv = x if key_value is None else key_value
        x = x + self.attention(x, kv, kv, need_weights=False)[0]
        x = self.norm2(x)
        x = x + self.mlp_residual(x)
        return self.mlp(x)


class TorchViT(nn.Module):
    """The README ViT written with plain `torch.nn` layers; `key_value` turns self- into cross-attention."""

    def __init__(self, embedding_dim: int, patch_size: int, image_size: int, num_layers: int, num_heads: int) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.grid = image_size // patch_size
        self.patch_embedding = nn.Conv2d(3, embedding_dim, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Parameter(torch.zeros(self.grid**2, embedding_dim))
        self.blocks = nn.ModuleList(TorchBlock(embedding_dim, num_heads) for _ in range(num_layers))

    def forward(self, image: torch.Tensor, key_value: torch.Tensor | None = None) -> torch.Tensor:
        batch = image.shape[0]
        # The README flattens the (B, E, h, w) patch map with a plain reshape, not a transpose: keep it.
        x = self.patch_embedding(image).reshape(batch, self.grid**2, self.embedding_dim)
        x = x + self.position
        for block in self.blocks:
            x = block(x, key_value)
        return x.reshape(batch, self.embedding_dim, self.grid, self.grid)


def copy_weights(vit: fl.Chain, reference: TorchViT) -> None:
    """Fill `reference` with the weights of a README ViT, layer by layer, by path."""

    def load(destination: torch.Tensor | None, path: str, name: str = "weight") -> None:
        source = getattr(vit[path], name)
        assert isinstance(destination, torch.Tensor) and isinstance(source, torch.Tensor), f"{path}.{name}"
        destination.copy_(source)

    with torch.no_grad():
        load(reference.patch_embedding.weight, "Conv2d")
        load(reference.patch_embedding.bias, "Conv2d", "bias")
        load(reference.position, "Residual.Parameter")
        for index, block in enumerate(reference.blocks, start=1):
            assert isinstance(block, TorchBlock)
            prefix = f"Chain_{index}"
            attention = f"{prefix}.Residual_1.Attention"
            for name in ("weight", "bias"):
                packed = getattr(block.attention, f"in_proj_{name}")
                for i, chunk in enumerate(packed.chunk(3), start=1):  # query, key, value
                    load(chunk, f"{attention}.Distribute.Linear_{i}", name)
                load(getattr(block.attention.out_proj, name), f"{attention}.Linear", name)
                load(getattr(block.norm1, name), f"{prefix}.LayerNorm_1", name)
                load(getattr(block.norm2, name), f"{prefix}.LayerNorm_2", name)
                for mlp, mlp_path in ((block.mlp_residual, "Residual_2"), (block.mlp, "Chain")):
                    load(getattr(mlp[0], name), f"{prefix}.{mlp_path}.Linear_1", name)
                    load(getattr(mlp[2], name), f"{prefix}.{mlp_path}.Linear_2", name)
