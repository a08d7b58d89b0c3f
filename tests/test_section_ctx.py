"""tests/section_ctx.py, through which the section tests run the GPU check's sections: an exception
that ctx.guard caught, an error or fail row, or a section over its time limit fails the test."""

import time
from types import SimpleNamespace

import pytest
import torch
from section_ctx import of, run_section


def _section(body):
    return SimpleNamespace(SECTION="stub", run=body)


def _passing(ctx):
    ctx.parity("exact", torch.ones(3), torch.ones(3, dtype=torch.float64), 0.0)
    ctx.time("timed", lambda: None)


def test_a_passing_section_gives_its_rows():
    rows = run_section(_section(_passing))
    assert [(r["name"], r["status"], r["measure"]) for r in rows] == [("exact", "pass", "parity"),
                                                                      ("timed", "ok", "time")]


def _guarded_raise(ctx):
    _passing(ctx)
    with ctx.guard("broken"):
        raise RuntimeError("a bug in the section")


def _error_record(ctx):
    ctx.record("count", status="error", note="recorded as an error")


def _failed_parity(ctx):
    ctx.parity("off", torch.ones(3), torch.full((3,), 2.0, dtype=torch.float64), 1e-6)


@pytest.mark.parametrize("body, message", [(_guarded_raise, "a bug in the section"),
                                           (_error_record, "error rows"),
                                           (_failed_parity, "failed rows")])
def test_an_error_or_a_failure_fails(body, message):
    with pytest.raises(AssertionError, match=message):
        run_section(_section(body))


def test_a_section_over_its_limit_fails_and_its_timings_skip():
    def slow(ctx):
        time.sleep(0.3)
        ctx.time("late", lambda: None)
        assert of(ctx.recorder.rows, name="late", status="skip")

    with pytest.raises(AssertionError, match="took"):
        run_section(_section(slow), limit_s=0.2)
