"""`refiners plugin new`: write a ready-to-test plugin package (see `refiners_core.scaffold.new`)."""

from refiners_core.scaffold.new import KINDS, PluginNames, new_plugin

__all__ = ["KINDS", "PluginNames", "new_plugin"]
