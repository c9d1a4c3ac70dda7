"""`migrate check`: the report matches what the kernel says when asked directly."""

from __future__ import annotations

import json
import os

import pytest

from migrate.cli import main
from migrate.uffd import Feature, supported_features

pytestmark = pytest.mark.host


def test_check_json_has_the_documented_keys_and_matches_the_kernel(capsys, need):
    need()
    assert main(["check", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("userfaultfd", "pagemap_scan", "pku", "thp", "hugetlb", "kernel", "works"):
        assert key in report
    u = report["userfaultfd"]
    assert u["available"] is True
    offered = supported_features()
    assert u["features"] == [f.name for f in Feature if f in offered]
    assert sorted(u["features_supported"]) == sorted(f.name for f in Feature)
    assert "COPY" in u["ioctls"] and "WAKE" in u["ioctls"]
    assert "CONTINUE" in u["ioctls_by_mode"]["shmem MINOR"]
    assert report["kernel"] == os.uname().release
    assert report["thp"]["enabled"] in ("always", "madvise", "never")
    assert all({"size", "nr", "free"} <= set(h) for h in report["hugetlb"])
    assert isinstance(report["pku"], bool)
    # the verdicts follow from the facts
    assert report["works"]["postcopy"]["ok"] is True
    assert report["works"]["precopy_dirty_tracking"]["ok"] == (
        "WP_ASYNC" in u["features"] and report["pagemap_scan_detail"]["wp_async"])


def test_check_human_output_names_every_feature(capsys, need):
    need()
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    for feature in Feature:
        assert feature.name in out
    assert "what works here" in out
