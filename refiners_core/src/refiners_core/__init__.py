"""refiners-core: Fluxion layers, contexts, adapters, weight I/O, plugins and the `refiners` CLI.

import refiners_core.fluxion as fl               # layers, Chain, contexts, Adapter
from refiners_core import load_tensors            # weight files
from refiners_core.plugins import registry        # what installed plugins contribute
"""

from importlib.metadata import version as _version

from refiners_core.module_names import ForeignModuleNames
from refiners_core.plugins import registry
from refiners_core.state_dicts import load_state_dict_checked
from refiners_core.weights import WeightsError, load_tensors, resolve_path, save_tensors

__version__ = _version("refiners-core")

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
