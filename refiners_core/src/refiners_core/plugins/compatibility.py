"""Whether an installed plugin was made for the installed refiners-core.

A plugin states the cores it works with the standard way, by its distribution's requirement on `refiners-core`
(`dependencies = ["refiners-core>=0.1,<0.2"]`). pip normally keeps that promise, but not always: `pip install
--no-deps`, a core upgraded after the plugin, an editable checkout of another branch. The loader checks the
requirement before importing a plugin, so a plugin made for another core is listed as incompatible, with both
versions named, instead of failing later in a way nobody can trace, or working by chance.

Requirements are read with `packaging`, the reference implementation of the specifier and marker grammar
(PEP 440, PEP 508), which pip and huggingface_hub (one of the core's dependencies) use too.
"""

from __future__ import annotations

from collections.abc import Iterable

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

PLUGIN_API_VERSION = "1.0"
"""The version of the plugin API this core implements: the hooks of `refiners_core.plugins.hookspecs` and the
spec classes of `refiners_core.plugins.specs`. Its major part changes when a change can break a plugin; a plugin
depends on it through its `refiners-core` requirement, whose version ranges map to API versions in the core's
README ("Writing a plugin")."""

CORE_DISTRIBUTION = "refiners-core"


def core_requirement(requires: Iterable[str] | None) -> Requirement | None:
    """Of a distribution's requirements (`Distribution.requires`), the one on refiners-core whatever extras are
    chosen, or None if there is none.

    A requirement behind an extra (`refiners-core>=0.2; extra == "x"`) does not count: installing the plugin
    without that extra does not ask for it. Raises ValueError naming the requirement if it cannot be parsed.
    """
    for text in requires or ():
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise ValueError(f"its requirement {text!r} cannot be parsed: {error}") from None
        if canonicalize_name(requirement.name) != CORE_DISTRIBUTION:
            continue
        if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
            return requirement
    return None


def incompatibility(requires: Iterable[str] | None, core_version: str) -> str | None:
    """Why a distribution with requirements `requires` (`Distribution.requires`) cannot run with refiners-core
    `core_version`, in one line, or None if it can.

    It can when it puts no requirement on refiners-core, or when its requirement's range holds `core_version`
    (pre-releases and local versions of the core included, so a development checkout is not refused). A core
    version that is not a valid version (`"?"`, when the core's metadata cannot be found) is not judged.
    Raises ValueError if the distribution's requirement cannot be parsed.
    """
    requirement = core_requirement(requires)
    if requirement is None or not str(requirement.specifier):
        return None
    try:
        version = Version(core_version)
    except InvalidVersion:
        return None
    if requirement.specifier.contains(version, prereleases=True):
        return None
    return (
        f"incompatible: it requires {CORE_DISTRIBUTION}{requirement.specifier}, but {CORE_DISTRIBUTION} "
        f"{core_version} (plugin API {PLUGIN_API_VERSION}) is installed; install a version of the plugin made "
        f"for this core, or a core in its range"
    )
