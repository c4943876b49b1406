"""The blocks of the Stable Diffusion 1.5 UNet.

Two contexts carry data to the blocks: `"diffusion"` holds the inputs set by the caller (`timestep`,
`clip_text_embedding`), `"unet"` holds what the UNet computes for its own layers (`timestep_embedding`,
and the skip connections `skip_0`, `skip_1`... from the down path to the up path).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import refiners_core.fluxion as fl
from refiners_core.fluxion import Device


class SinusoidalEmbedding(fl.Module):
    """Encode timesteps `(N,)` (or a scalar) as `(N, dim)` features `[cos(t f_i), sin(t f_i)]`, `f_i = 10000^(-2i/dim)`.

    The angles are computed in float32 (float64 for a float64 model), then cast to the model's dtype: half
    precision cannot resolve `t f_i` for timesteps in the hundreds.
    """

    anchor: torch.Tensor

    def __init__(self, dim: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"SinusoidalEmbedding needs an even dim, got {dim}")
        self.dim = dim
        # An empty buffer that follows the model's device and dtype through `.to()`; not part of the state dict.
        self.register_buffer("anchor", torch.empty(0, device=device, dtype=dtype), persistent=False)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        compute_dtype = torch.promote_types(self.anchor.dtype, torch.float32)
        half = self.dim // 2
        exponents = -math.log(10000.0) * torch.arange(half, device=self.anchor.device, dtype=compute_dtype) / half
        angles = timestep.reshape(-1, 1).to(device=self.anchor.device, dtype=compute_dtype) * exponents.exp()
        return torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.anchor.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class TimestepEncoder(fl.Passthrough):
    """Embed the `diffusion.timestep` context into `unet.timestep_embedding` (sinusoids, then an MLP)."""

    def __init__(
        self, channels: int, embedding_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.UseContext("diffusion", "timestep"),
            SinusoidalEmbedding(channels, device=device, dtype=dtype),
            fl.Linear(channels, embedding_dim, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Linear(embedding_dim, embedding_dim, device=device, dtype=dtype),
            fl.SetContext("unet", "timestep_embedding"),
        )


class TimestepBias(fl.Residual):
    """Add a per-channel bias computed from the timestep embedding: `x + Linear(silu(embedding))`."""

    def __init__(
        self, embedding_dim: int, channels: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.UseContext("unet", "timestep_embedding"),
            fl.SiLU(),
            fl.Linear(embedding_dim, channels, device=device, dtype=dtype),
            fl.Reshape(channels, 1, 1),
        )


class ResidualBlock(fl.Sum):
    """Two `GroupNorm -> SiLU -> 3x3 Conv2d` stages with a timestep bias between them, plus a shortcut.

    The shortcut is a 1x1 convolution when the number of channels changes, the identity otherwise.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        embedding_dim: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.in_channels = in_channels
        self.out_channels = out_channels
        shortcut = (
            fl.Conv2d(in_channels, out_channels, kernel_size=1, device=device, dtype=dtype)
            if in_channels != out_channels
            else fl.Identity()
        )
        super().__init__(
            fl.Chain(
                fl.GroupNorm(in_channels, num_groups, eps=eps, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
                TimestepBias(embedding_dim, out_channels, device=device, dtype=dtype),
                fl.GroupNorm(out_channels, num_groups, eps=eps, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, device=device, dtype=dtype),
            ),
            shortcut,
        )

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"


class GEGLU(fl.Module):
    """Gated GeLU: split the last dimension in halves `(x, gate)` and return `x * gelu(gate)`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = x.chunk(2, dim=-1)
        # In place on gelu's output (its backward reads its input): one (B, H * W, 4 * dim) temporary less.
        return F.gelu(gate).mul_(x)


class FeedForward(fl.Chain):
    """`Linear -> GEGLU -> Linear`, with an inner dimension of `4 * dim`."""

    def __init__(self, dim: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        inner_dim = 4 * dim
        super().__init__(
            fl.Linear(dim, 2 * inner_dim, device=device, dtype=dtype),
            GEGLU(),
            fl.Linear(inner_dim, dim, device=device, dtype=dtype),
        )

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        (x,) = args
        layers = tuple(self)
        projection = layers[0]
        if len(layers) == 3 and type(projection) is fl.Linear and projects_transposed(x, projection.out_features):
            # The same layers, with the projection's product in the cheaper orientation (see `projects_transposed`).
            rows = x.reshape(-1, x.shape[-1])
            weight, bias = projection.weight, projection.bias
            if bias is None:  # pyright: ignore[reportUnnecessaryComparison]
                hidden = (weight @ rows.t()).t()
            else:
                hidden = torch.addmm(bias.unsqueeze(1), weight, rows.t()).t()
            return layers[2](layers[1](hidden)).reshape(*x.shape[:-1], -1)
        return super().forward(x)


TRANSPOSED_MIN_RATIO = 8
"""`projects_transposed`'s threshold: output features per input row (token), measured on a 2-core AMD EPYC (Zen 3,
AVX2, MKL) with torch 2.13, one thread: `W @ x.T` takes 0.85-0.92x the time of `x @ W.T` for 128-512 rows of 1280
features into 10240 (the feed-forward projection of the 1280-channel level of SDXL and SD1.5 at latent size 64 has
512 rows at batch 2) and for 512 rows of 640 into 5120, 0.97-0.99x for 1024-2048 rows, 1.13x for 8192 rows of 320
into 2560."""


def projects_transposed(x: torch.Tensor, out_features: int) -> bool:
    """Whether a linear projection of `x` (`(..., in_features)`) to `out_features` is cheaper computed transposed,
    as `(weight @ x.T).T`: on the CPU in float32, for few rows (tokens) against many output features
    (`TRANSPOSED_MIN_RATIO`), with gradients off. The result is the same up to float rounding; its layout is
    column-major, which the GEGLU and the output projection of `FeedForward` read without a copy. Its rounding
    depends on where the weights lie in memory, so training keeps the usual orientation: a training run gives the
    same losses whichever file layout its weights were loaded from."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    return rows * TRANSPOSED_MIN_RATIO <= out_features


@dataclass(frozen=True)
class TextKeysValues:
    """The keys and values a `CrossAttention` computed from a text embedding, with what they were computed from: a
    copy of the embedding, the layers of its key and value projections, and each of their tensors with its storage
    pinned and its version counter."""

    text: torch.Tensor
    layers: tuple[nn.Module, ...]
    tensors: tuple[tuple[torch.Tensor, torch.Tensor, int], ...]
    keys: torch.Tensor
    values: torch.Tensor

    def serves(self, text: torch.Tensor, layers: tuple[nn.Module, ...], tensors: tuple[torch.Tensor, ...]) -> bool:
        """Whether these keys and values are those of `text` through `layers` holding `tensors` (the same layers and
        tensors, unchanged)."""
        if len(layers) != len(self.layers) or any(a is not b for a, b in zip(layers, self.layers, strict=True)):
            return False
        if len(tensors) != len(self.tensors):
            return False
        for tensor, (cached, pinned, version) in zip(tensors, self.tensors, strict=True):
            if tensor is not cached or tensor.data_ptr() != pinned.data_ptr() or tensor.device != pinned.device:
                return False
            if tensor._version != version:
                return False
        same_kind = (text.shape, text.dtype, text.device) == (self.text.shape, self.text.dtype, self.text.device)
        return same_kind and torch.equal(text, self.text)


class CrossAttention(fl.Chain):
    """Attention of the tokens (queries) to the `diffusion.clip_text_embedding` context (keys and values).

    The text embedding is the same at every step of a generation, and so are its keys and values: with gradients
    off and outside `torch.compile`, when the key and value projections are pure layers (`fl.is_pure`: an
    `fl.Linear`, or one adapted by a LoRA, whose outputs depend on the text and their own tensors only) and the rest
    of the attention's structure is the one it was built with, they are computed once and reused while the
    embedding is equal (`torch.equal` against a copy), the projections are the same layers and their tensors the
    same tensors, unchanged (same storage, same version counter: a fused LoRA, a new LoRA scale, a loaded state dict
    or `.to()` recomputes them). As for autograd, a write through `.data` is not seen. Tensors without a version
    counter (inference tensors: a model or LoRA built or converted under `torch.inference_mode()`) are never reused
    from; `from_pretrained` gives normal tensors even under it. The cache holds a copy of the embedding and its keys
    and values: per batch item, 77 x (context_dim + 2 x dim) values.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        context_dim: int,
        device: Device = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            fl.Parallel(
                fl.Identity(),
                fl.UseContext("diffusion", "clip_text_embedding"),
                fl.UseContext("diffusion", "clip_text_embedding"),
            ),
            fl.Attention(
                dim,
                num_heads=num_heads,
                key_embedding_dim=context_dim,
                value_embedding_dim=context_dim,
                use_bias=False,
                device=device,
                dtype=dtype,
            ),
        )
        self.text_keys_values: TextKeysValues | None = None

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        (x,) = args
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return super().forward(x)
        parts = self.reusable_parts()
        if parts is None:
            self.text_keys_values = None
            return super().forward(x)
        inputs, query, key, value, attention, output = parts
        x, text, _ = inputs(x)
        keys, values = self.keys_values(text, key, value)
        return output(attention(query(x), keys, values))

    def reusable_parts(
        self,
    ) -> tuple[fl.Parallel, fl.Module, fl.Module, fl.Module, fl.ScaledDotProductAttention, fl.Module] | None:
        """The layers of this cross-attention (inputs, query, key, value, attention, output) when its structure is
        the one it was built with and its key and value projections are pure (`fl.is_pure`), else None."""
        layers = tuple(self)
        if len(layers) != 2:
            return None
        inputs, attention = layers
        if type(inputs) is not fl.Parallel or type(attention) is not fl.Attention:
            return None
        sources = tuple(inputs)
        if len(sources) != 3 or type(sources[0]) is not fl.Identity:
            return None
        if any(type(s) is not fl.UseContext or (s.context, s.key) != TEXT_CONTEXT for s in sources[1:]):
            return None
        if len(attention) != 3:
            return None
        distribute, sdpa, output = tuple(attention)
        if type(distribute) is not fl.Distribute or len(distribute) != 3:
            return None
        query, key, value = tuple(distribute)
        if type(sdpa) is not fl.ScaledDotProductAttention or not fl.is_pure(key) or not fl.is_pure(value):
            return None
        return inputs, query, key, value, sdpa, output

    def keys_values(self, text: torch.Tensor, key: fl.Module, value: fl.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `text`, reused from the last call when they are still valid (see the class)."""
        layers = (*key.modules(), *value.modules())
        tensors = (*key.parameters(), *key.buffers(), *value.parameters(), *value.buffers())
        cached = self.text_keys_values
        if cached is not None and cached.serves(text, layers, tensors):
            return cached.keys, cached.values
        keys, values = key(text), value(text)
        if any(t.is_inference() for t in tensors):  # no version counter: a change could not be seen
            self.text_keys_values = None
        else:
            pinned = tuple((t, t.detach(), t._version) for t in tensors)
            self.text_keys_values = TextKeysValues(text.clone(), layers, pinned, keys, values)
        return keys, values


TEXT_CONTEXT = ("diffusion", "clip_text_embedding")
"""Where a `CrossAttention` reads the text embedding it attends to."""


class TransformerBlock(fl.Chain):
    """Self-attention, cross-attention to the text, feed-forward; each pre-normalised and residual."""

    def __init__(
        self, dim: int, num_heads: int, context_dim: int, device: Device = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(
            fl.Residual(
                fl.LayerNorm(dim, device=device, dtype=dtype),
                fl.SelfAttention(dim, num_heads=num_heads, use_bias=False, device=device, dtype=dtype),
            ),
            fl.Residual(
                fl.LayerNorm(dim, device=device, dtype=dtype),
                CrossAttention(dim, num_heads, context_dim, device=device, dtype=dtype),
            ),
            fl.Residual(
                fl.LayerNorm(dim, device=device, dtype=dtype),
                FeedForward(dim, device=device, dtype=dtype),
            ),
        )


class Tokens(fl.Chain):
    """Run the layers on the `(B, H * W, C)` tokens of a `(B, C, H, W)` feature map, and fold the result back."""

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        (x,) = args
        batch, _, height, width = x.shape
        tokens: torch.Tensor = super().forward(x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(batch, -1, height, width)


class CrossAttentionBlock2d(fl.Residual):
    """The spatial transformer: `x + proj_out(transformers(proj_in(GroupNorm(x))))`, on the pixels as tokens.

    `depth` transformer blocks run one after the other between the projections (1 in SD1.5, up to 10 in SDXL).
    The input and output projections are linear layers on the tokens: the reference's 1x1 convolutions (SD1) or
    linear projections (SD2, SDXL), which compute the same thing (a 1x1 convolution kernel loads into them).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        num_groups: int = 32,
        device: Device = None,
        dtype: torch.dtype | None = None,
        depth: int = 1,
    ) -> None:
        self.channels = channels
        self.num_heads = num_heads
        self.depth = depth
        super().__init__(
            fl.GroupNorm(channels, num_groups, eps=1e-6, device=device, dtype=dtype),
            Tokens(
                fl.Linear(channels, channels, device=device, dtype=dtype),
                *(TransformerBlock(channels, num_heads, context_dim, device=device, dtype=dtype) for _ in range(depth)),
                fl.Linear(channels, channels, device=device, dtype=dtype),
            ),
        )

    def extra_repr(self) -> str:
        depth = f", depth={self.depth}" if self.depth != 1 else ""
        return f"channels={self.channels}, num_heads={self.num_heads}{depth}"


class SaveSkip(fl.SetContext):
    """Store the output of a down block as the skip connection `unet.skip_<index>` and pass it on."""

    def __init__(self, index: int) -> None:
        super().__init__("unet", f"skip_{index}")
        self.index = index

    def extra_repr(self) -> str:
        return f"index={self.index}"


class ConcatenateSkip(fl.Concatenate):
    """Concatenate the skip connection `unet.skip_<index>` to the input, along the channels."""

    def __init__(self, index: int) -> None:
        super().__init__(fl.Identity(), fl.UseContext("unet", f"skip_{index}"), dim=1)
        self.index = index

    def extra_repr(self) -> str:
        return f"index={self.index}, dim=1"


class Upsample(fl.Upsample):
    """Upsample to the size of the skip connection `unet.skip_<index>` that comes next, then a 3x3 convolution.

    That is twice the input size, except where the down path halved an odd size (then it is one less).
    """

    def __init__(self, channels: int, skip_index: int, device: Device = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(channels, size_of=("unet", f"skip_{skip_index}"), device=device, dtype=dtype)
