"""The layer library: every building block of a Fluxion model."""

from refiners_core.fluxion.layers.activations import GeLU, QuickGeLU, ReLU, Sigmoid, SiLU, Softmax, Tanh
from refiners_core.fluxion.layers.attention import Attention, ScaledDotProductAttention, SelfAttention
from refiners_core.fluxion.layers.basics import (
    Chunk,
    Dropout,
    Flatten,
    GetArg,
    Identity,
    Multiply,
    Parameter,
    Permute,
    Reshape,
    Slicing,
    Squeeze,
    Transpose,
    Unflatten,
    Unsqueeze,
)
from refiners_core.fluxion.layers.context import SetContext, UseContext
from refiners_core.fluxion.layers.converter import Converter
from refiners_core.fluxion.layers.convolution import Conv2d, ConvTranspose2d
from refiners_core.fluxion.layers.embedding import Embedding
from refiners_core.fluxion.layers.linear import Linear, MultiLinear
from refiners_core.fluxion.layers.norms import GroupNorm, LayerNorm, LayerNorm2d
from refiners_core.fluxion.layers.sampling import Downsample, Interpolate, Pad, Upsample

__all__ = [
    "Attention",
    "Chunk",
    "Conv2d",
    "ConvTranspose2d",
    "Converter",
    "Downsample",
    "Dropout",
    "Embedding",
    "Flatten",
    "GeLU",
    "GetArg",
    "GroupNorm",
    "Identity",
    "Interpolate",
    "LayerNorm",
    "LayerNorm2d",
    "Linear",
    "MultiLinear",
    "Multiply",
    "Pad",
    "Parameter",
    "Permute",
    "QuickGeLU",
    "ReLU",
    "Reshape",
    "ScaledDotProductAttention",
    "SelfAttention",
    "SetContext",
    "Sigmoid",
    "SiLU",
    "Slicing",
    "Softmax",
    "Squeeze",
    "Tanh",
    "Transpose",
    "Unflatten",
    "Unsqueeze",
    "Upsample",
    "UseContext",
]
