"""Test helpers for this ecosystem's packages and for third-party plugins, public and documented.

- `relative_error`, `assert_relative_close`, `assert_bitwise_equal`: how parity tests compare outputs.
- `fresh_dynamo`, `fail_on_recompile`: `torch.compile` tests.
- `FakeDistributions`: plugin distributions that look installed, without pip.
- `check_adapter`: every promise of an adapter, checked on a model (see `refiners_core.testing.adapters`).

refiners-core also registers a pytest plugin (`refiners_core.testing.pytest_plugin`, the `pytest11` entry point):
the fixtures `plugin_site` and `fresh_dynamo` are available in any test suite of an environment where refiners-core
is installed. Importing this package imports torch; the pytest plugin alone does not.
"""

from refiners_core.testing.adapters import AdapterCheckReport, check_adapter
from refiners_core.testing.closeness import assert_bitwise_equal, assert_relative_close, relative_error
from refiners_core.testing.distributions import FakeDistributions
from refiners_core.testing.dynamo import fail_on_recompile, fresh_dynamo

__all__ = [
    "AdapterCheckReport",
    "FakeDistributions",
    "assert_bitwise_equal",
    "assert_relative_close",
    "check_adapter",
    "fail_on_recompile",
    "fresh_dynamo",
    "relative_error",
]
