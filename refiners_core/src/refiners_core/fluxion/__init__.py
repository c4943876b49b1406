"""Fluxion: declarative PyTorch models written as trees of layers.

    import refiners_core.fluxion as fl

    model = fl.Chain(fl.Linear(8, 16), fl.SiLU(), fl.Linear(16, 8))

Every layer, the `Chain` and its combinators, the Context API and the Adapter protocol are available
from this one namespace.
"""

from refiners_core.fluxion.adapters import Adapter, AdapterError
from refiners_core.fluxion.chain import Chain, Concatenate, Distribute, Lambda, Parallel, Passthrough, Residual, Sum
from refiners_core.fluxion.context import Context, ContextError, ContextProvider, Contexts
from refiners_core.fluxion.layers import *  # noqa: F403
from refiners_core.fluxion.layers import __all__ as _layers
from refiners_core.fluxion.module import Module

__all__ = [
    "Adapter",
    "AdapterError",
    "Chain",
    "Concatenate",
    "Context",
    "ContextError",
    "ContextProvider",
    "Contexts",
    "Distribute",
    "Lambda",
    "Module",
    "Parallel",
    "Passthrough",
    "Residual",
    "Sum",
    *_layers,
]
