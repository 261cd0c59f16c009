"""Progress fractions, stages, JSON lines and cancellation."""

from __future__ import annotations

import io as stdio
import json

import pytest
from meddl.errors import Cancelled
from meddl.progress import CancelToken, Reporter, json_progress


def test_stages_map_onto_one_monotone_range():
    seen = []
    rep = Reporter(lambda f, m: seen.append((round(f, 6), m)))
    rep(0.0, "start")
    first = rep.stage(0.0, 0.5)
    first(0.5, "a")
    first(1.0, "b")
    second = rep.stage(0.5, 1.0).stage(0.5, 1.0)
    second(0.0, "c")
    second(2.0, "clamped")
    assert seen == [(0.0, "start"), (0.25, "a"), (0.5, "b"), (0.75, "c"), (1.0, "clamped")]


def test_stage_prefixes_name_where_the_work_is():
    seen = []
    rep = Reporter(lambda f, m: seen.append(m))
    label = rep.stage(0.0, 0.5, "label 3 (2/20): ")
    label(0.5, "slice 4/95")
    label.stage(0.0, 1.0, "pass 1: ")(0.0, "x")
    label(1.0)
    assert seen == ["label 3 (2/20): slice 4/95", "label 3 (2/20): pass 1: x", "label 3 (2/20): "]


def test_cancel_stops_at_next_report():
    token = CancelToken()
    rep = Reporter(None, token)
    rep(0.1, "fine")
    token.cancel()
    with pytest.raises(Cancelled, match="cancelled by the user"):
        rep.stage(0.2, 0.4)(0.5, "never reported")


def test_json_lines_are_parseable():
    buf = stdio.StringIO()
    report = json_progress(buf)
    report(0.42, "warping")
    report(1, "done")
    lines = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert lines == [{"progress": 0.42, "message": "warping"}, {"progress": 1.0, "message": "done"}]


def test_reporter_of_accepts_callback_reporter_or_none():
    rep = Reporter()
    assert Reporter.of(rep) is rep
    Reporter.of(None)(0.5, "silent")
    got = []
    Reporter.of(lambda f, m: got.append(f))(0.3)
    assert got == [0.3]
