"""Test settings shared by every package's tests (pytest loads this file from the rootdir for any test path)."""

from __future__ import annotations

import os

try:
    import hypothesis
except ImportError:  # a session without hypothesis among its test dependencies
    hypothesis = None

if hypothesis is not None:
    # Property tests draw the same examples on every run, so that CI's result depends on the commit only; set
    # HYPOTHESIS_PROFILE=explore to draw new ones locally.
    hypothesis.settings.register_profile("ci", derandomize=True, database=None)
    hypothesis.settings.register_profile("explore")
    hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
