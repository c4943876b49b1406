"""refiners-core: Fluxion layers, contexts, adapters, weight I/O, plugins and the `refiners` CLI.

import refiners_core.fluxion as fl               # layers, Chain, contexts, Adapter
from refiners_core import load_tensors            # weight files
from refiners_core.plugins import registry        # what installed plugins contribute

Importing the package (and `refiners_core.plugins`, and the `refiners` CLI up to running a command) does not import
torch: the names below that need it are imported on first use.
"""

from __future__ import annotations

from importlib.metadata import version as _version
from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports
from refiners_core.plugins import registry

if TYPE_CHECKING:
    from refiners_core.module_names import ForeignModuleNames
    from refiners_core.state_dicts import load_state_dict_checked
    from refiners_core.weights import WeightsError, load_tensors, resolve_path, save_tensors

__version__ = _version("refiners-core")

_LAZY = {
    "ForeignModuleNames": "refiners_core.module_names",
    "load_state_dict_checked": "refiners_core.state_dicts",
    "WeightsError": "refiners_core.weights",
    "load_tensors": "refiners_core.weights",
    "resolve_path": "refiners_core.weights",
    "save_tensors": "refiners_core.weights",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "ForeignModuleNames",
    "WeightsError",
    "__version__",
    "load_state_dict_checked",
    "load_tensors",
    "registry",
    "resolve_path",
    "save_tensors",
]
