"""refiners-sam registers itself through the `refiners` entry point group, like any third-party plugin."""

from __future__ import annotations

from refiners_core.plugins import registry


def test_refiners_sam_is_discovered_through_its_entry_point() -> None:
    records = [record for record in registry(reload=True).plugins if record.distribution == "refiners-sam"]
    assert len(records) == 1
    record = records[0]
    assert record.entry_point == "sam = refiners_sam.plugin"
    assert record.error is None
    assert record.status == "ok"
