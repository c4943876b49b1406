"""Test helpers for this ecosystem's packages and for third-party plugins, public and documented.

- `relative_error`, `assert_relative_close`, `assert_bitwise_equal`: how parity tests compare outputs.
- `fresh_dynamo`, `fail_on_recompile`: `torch.compile` tests.
- `FakeDistributions`: plugin distributions that look installed, without pip; `GREETER_PLUGIN`, one that works.
- `check_adapter`: every promise of an adapter, checked on a model (see `refiners_core.testing.adapters`).
- `state_snapshot`, `assert_state_unchanged`, `Original`: a model is back exactly as it was; `outputs_after_each`.
- `randomize_parameters`: random weights from a seed.
- `refiners_core.testing.readme_vit`: the README's toy ViT, and a plain-torch twin of it.
- `refiners_core.testing.files`: `change_file`, a weights file changed behind a loaded model's back.
- `is_mapped`, `is_view_of_file`, `parameters_viewing`, `CAN_READ_MAPPINGS`: whether weights were copied or
  memory-mapped from a file (`refiners_core.testing.mappings`, Linux).

refiners-core also registers a pytest plugin (`refiners_core.testing.pytest_plugin`, the `pytest11` entry point):
the fixtures `plugin_site` and `fresh_dynamo` are available in any test suite of an environment where refiners-core
is installed. The names that need torch are imported on first use, so the pytest plugin loads without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from refiners_core.lazy import lazy_exports
from refiners_core.testing.distributions import GREETER_PLUGIN, FakeDistributions

if TYPE_CHECKING:
    from refiners_core.testing.adapters import AdapterCheckReport, check_adapter
    from refiners_core.testing.closeness import assert_bitwise_equal, assert_relative_close, relative_error
    from refiners_core.testing.dynamo import fail_on_recompile, fresh_dynamo
    from refiners_core.testing.mappings import CAN_READ_MAPPINGS, is_mapped, is_view_of_file, parameters_viewing
    from refiners_core.testing.random_weights import randomize_parameters
    from refiners_core.testing.states import Original, assert_state_unchanged, outputs_after_each, state_snapshot

_LAZY = {
    "AdapterCheckReport": "refiners_core.testing.adapters",
    "check_adapter": "refiners_core.testing.adapters",
    "assert_bitwise_equal": "refiners_core.testing.closeness",
    "assert_relative_close": "refiners_core.testing.closeness",
    "relative_error": "refiners_core.testing.closeness",
    "fail_on_recompile": "refiners_core.testing.dynamo",
    "fresh_dynamo": "refiners_core.testing.dynamo",
    "randomize_parameters": "refiners_core.testing.random_weights",
    "Original": "refiners_core.testing.states",
    "assert_state_unchanged": "refiners_core.testing.states",
    "outputs_after_each": "refiners_core.testing.states",
    "state_snapshot": "refiners_core.testing.states",
    "CAN_READ_MAPPINGS": "refiners_core.testing.mappings",
    "is_mapped": "refiners_core.testing.mappings",
    "is_view_of_file": "refiners_core.testing.mappings",
    "parameters_viewing": "refiners_core.testing.mappings",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "CAN_READ_MAPPINGS",
    "AdapterCheckReport",
    "FakeDistributions",
    "GREETER_PLUGIN",
    "Original",
    "assert_bitwise_equal",
    "assert_relative_close",
    "assert_state_unchanged",
    "check_adapter",
    "fail_on_recompile",
    "fresh_dynamo",
    "outputs_after_each",
    "randomize_parameters",
    "is_mapped",
    "is_view_of_file",
    "parameters_viewing",
    "relative_error",
    "state_snapshot",
]
