"""The bridge builds frame keys by the grammar the daemon's zenoh source parses: both read the
same vectors (`tests/vectors/frame_keys.json`; the Rust side is `frame_keys_follow_the_shared_vectors`
in daemon/src/zenoh_source.rs)."""

import json
from pathlib import Path

import pytest

useq = pytest.importorskip("useq")
from liveomics_bridge import frame_key  # noqa: E402

VECTORS = json.loads((Path(__file__).parent / "vectors" / "frame_keys.json").read_text())
PLAN = VECTORS["plan"]


def event(case):
    return useq.MDAEvent(channel=case["channel"], metadata={"liveomics": {"well": case["well"], "field": case["field"]}})


@pytest.mark.parametrize("case", VECTORS["valid"], ids=lambda c: c["key"])
def test_the_bridge_builds_every_valid_key(case):
    assert frame_key(PLAN["instrument"], PLAN["plate"], event(case)) == case["key"]


@pytest.mark.parametrize("case", [c for c in VECTORS["invalid"] if "well" in c], ids=lambda c: c["key"])
def test_the_bridge_refuses_parts_that_are_not_key_chunks(case):
    with pytest.raises(ValueError, match="not a key chunk"):
        frame_key(PLAN["instrument"], PLAN["plate"], event(case))
