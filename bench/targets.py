"""The project's performance targets (/work/shared/PERFORMANCE.md, issue 19 item 6), evaluated
on the rows of one GPU check run: every figure that has a target gets ``row["target"]`` =
{"what", "goal", "value", "pass"} (pass None where an input is missing, e.g. a ceiling on the
CPU smoke run), for both views (cold do_bench and the steady loop). Plain functions over the
JSON rows: bench/gpu_check.py annotates its rows with them, bench/report.py can re-read them.

Roofs use the ceilings measured in the same run: the copy floor counts one read of X and T
(bytes_per_step); an IEEE fp32 step's FMA floor is 4·N·D·O flops at the measured SGEMM rate
(IEEE FMAs); a bf16 step's bytes are 2-byte elements (half the fp32 bytes).
"""

from __future__ import annotations

from typing import Any, Callable

ROOF_FRACTION = 0.8  # steps and inference: >= 80 % of the roof
TUTORIAL_US = 1.0  # tutorial fit: <= 1 us per step
MINIBATCH_US = 10.0  # mini-batch fit: <= 10 us per step ...
MINIBATCH_VS_GRAPHED = 4.0  # ... and >= 4x the CUDA-graphed eager step
STATISTICS_RATIO = 1.5  # 100 epochs from statistics <= 1.5x one fused pass
STREAM_FRACTION = 0.8  # streaming from host memory >= 80 % of pinned host-to-device bandwidth
HOST_RATIO = 0.15  # host time of a fused call <= 0.15x the eager step's, same machine

Index = dict[tuple, dict[str, Any]]
TIMED = ("time", "steady")


def _key(row: dict[str, Any], **over: Any) -> tuple:
    r = {**row, **over}
    return (r.get("section"), r.get("regime"), r.get("peer"), r.get("view"))


def _result(what: str, goal: str, value: float | None, ok: bool | None, unit: str, **extra: Any) -> dict[str, Any]:
    """unit: how value reads ("%": a fraction, "x": a ratio, "us": microseconds)."""
    return {"what": what, "goal": goal, "value": value, "unit": unit, "pass": ok, **extra}


def _ms(row: dict[str, Any] | None) -> float | None:
    v = None if row is None else row.get("ms_per_step")
    return v if isinstance(v, (int, float)) and v == v and v > 0 else None


def step_roof(row: dict[str, Any], index: Index, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    """Large full-batch fused steps in the default precision: >= 80 % of their roof."""
    if not (row.get("section") == "regimes" and row.get("regime_kind") == "step" and row.get("batch") is None
            and row.get("family") == "fused" and row.get("precision") == "auto" and row.get("measure") in TIMED):
        return None
    copy, sgemm, ms = ceilings.get("copy_gbps"), ceilings.get("sgemm_tflops"), _ms(row)
    what = "full-batch step, default precision: share of its roof"
    if not copy or ms is None:
        return _result(what, f">= {ROOF_FRACTION:.0%}", None, None, "%", note="no copy ceiling or no time")
    floors = {"copy": row["bytes_per_step"] / (copy * 1e6)}
    if row.get("dtype") == "fp32" and row.get("resolved_precision") == "ieee" and row.get("flops_per_step"):
        if not sgemm:
            return _result(what, f">= {ROOF_FRACTION:.0%}", None, None, "%", note="IEEE fp32 without a measured SGEMM rate")
        floors["fma"] = row["flops_per_step"] / (sgemm * 1e9)
    bound = max(floors, key=floors.get)
    value = floors[bound] / ms
    return _result(what, f">= {ROOF_FRACTION:.0%} of the {bound} floor", value, value >= ROOF_FRACTION, "%",
                   roof_ms=floors[bound], floors_ms=floors)


def inference(row: dict[str, Any], index: Index, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    """model(x): never slower than nn.Linear (timed twice around it: the slower of the two is the
    bar, their spread being the noise), and >= 80 % of copy where the kernel runs."""
    if not (row.get("section") == "inference" and row.get("family") == "fused-forward" and row.get("measure") in TIMED):
        return None
    ms = _ms(row)
    linear = [_ms(index.get(_key(row, peer=p))) for p in ("nn.Linear", "nn.Linear (again)")]
    linear = [v for v in linear if v is not None]
    what = "inference: vs nn.Linear" + (", share of copy" if row.get("route") == "kernel" else " (routed to the GEMM)")
    if ms is None or not linear:
        return _result(what, "never slower than nn.Linear", None, None, "x", note="no time for this or nn.Linear")
    speedup = max(linear) / ms
    ok = speedup >= 1.0
    goal = "never slower than nn.Linear"
    extra: dict[str, Any] = {"speedup_vs_linear": speedup, "linear_ms": linear}
    if row.get("route") == "kernel":
        frac = row.get("frac_copy")
        goal += f", >= {ROOF_FRACTION:.0%} of copy"
        if frac is None:  # no copy ceiling: only a slower kernel is known to fail
            ok = None if ok else False
        else:
            ok = ok and frac >= ROOF_FRACTION
        extra["frac_copy"] = frac
    return _result(what, goal, speedup, ok, "x", **extra)


def tutorial_fit(row: dict[str, Any], index: Index, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    if not (row.get("section") == "regimes" and row.get("regime_name") == "tutorial"
            and row.get("family") == "fused-fit" and row.get("measure") in TIMED):
        return None
    ms = _ms(row)
    us = None if ms is None else ms * 1e3
    return _result("tutorial fit: us per step", f"<= {TUTORIAL_US:g} us", us, None if us is None else us <= TUTORIAL_US,
                   "us")


def minibatch_fit(row: dict[str, Any], index: Index, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    if not (row.get("section") == "regimes" and str(row.get("regime_name", "")).startswith("minibatch")
            and row.get("family") == "fused-fit" and row.get("measure") in TIMED):
        return None
    ms = _ms(row)
    graphed = next((_ms(r) for k, r in index.items() if k[:2] == _key(row)[:2] and k[3] == row.get("view")
                    and r.get("family") == "graph"), None)
    what = "mini-batch fit: us per step, and x the CUDA-graphed eager step"
    goal = f"<= {MINIBATCH_US:g} us and >= {MINIBATCH_VS_GRAPHED:g}x graphed eager"
    if ms is None:
        return _result(what, goal, None, None, "us")
    us = ms * 1e3
    vs = None if graphed is None else graphed / ms
    ok = us <= MINIBATCH_US and (vs is not None and vs >= MINIBATCH_VS_GRAPHED)
    return _result(what, goal, us, ok if vs is not None or us > MINIBATCH_US else None, "us", vs_graphed=vs)


def statistics_epochs(row: dict[str, Any], index: Index, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    if not (row.get("section") == "statistics" and str(row.get("peer", "")).startswith("fit(statistics=True)")
            and row.get("measure") in TIMED):
        return None
    ms, one_pass = _ms(row), _ms(index.get(_key(row, peer="one fused pass (train_step)")))
    ratio = None if ms is None or one_pass is None else ms / one_pass
    return _result("statistics: the full-batch epochs over one fused pass", f"<= {STATISTICS_RATIO:g}x", ratio,
                   None if ratio is None else ratio <= STATISTICS_RATIO, "x", one_pass_ms=one_pass)


def stream(row: dict[str, Any], index: Index, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    if not (row.get("section") == "statistics" and str(row.get("peer", "")).startswith("stream")
            and row.get("measure") in TIMED):
        return None
    h2d, gbps = ceilings.get("h2d_gbps"), row.get("gbps")
    frac = None if not h2d or gbps is None else gbps / h2d
    return _result("out-of-core statistics: share of pinned host-to-device bandwidth", f">= {STREAM_FRACTION:.0%}",
                   frac, None if frac is None else frac >= STREAM_FRACTION, "%", h2d_gbps=h2d)


def host_time(row: dict[str, Any], index: Index, ceilings: dict[str, Any]) -> dict[str, Any] | None:
    if not (row.get("section") == "host" and row.get("fused") and row.get("host_us") is not None):
        return None
    eager = next((r for r in index.values() if r.get("section") == "host" and r.get("regime") == row.get("regime")
                  and r.get("peer") == "eager step"), None)
    ratio = None if eager is None or not eager.get("host_us") else row["host_us"] / eager["host_us"]
    return _result("host time per call over the eager step's, same machine", f"<= {HOST_RATIO:g}x", ratio,
                   None if ratio is None else ratio <= HOST_RATIO, "x")


RULES: list[Callable[[dict, Index, dict], dict | None]] = [step_roof, inference, tutorial_fit, minibatch_fit,
                                                           statistics_epochs, stream, host_time]


def annotate(rows: list[dict[str, Any]], ceilings: dict[str, Any], claims: bool = True) -> list[dict[str, Any]]:
    """Set row["target"] on every row a target applies to; returns one summary entry per target.
    claims=False (the CPU smoke run): values are computed, verdicts left out (pass None)."""
    index: Index = {_key(r): r for r in rows if r.get("measure") in TIMED or r.get("section") == "host"}
    out = []
    for row in rows:
        for rule in RULES:
            result = rule(row, index, ceilings)
            if result is not None and not claims:
                result.update({"pass": None, "note": "CPU smoke run: no performance claim"})
            if result is not None:
                row["target"] = result
                out.append({"section": row.get("section"), "name": row.get("name"), "view": row.get("view"), **result})
    return out


def derive(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_baseline on every timed row of a regime: the baseline peer's time per step (same
    section, regime and view) over this row's."""
    base = {(r.get("section"), r.get("regime"), r.get("view")): _ms(r) for r in rows
            if r.get("baseline") and r.get("measure") in TIMED and _ms(r)}
    for r in rows:
        if r.get("measure") in TIMED and r.get("regime") is not None:
            b, ms = base.get((r.get("section"), r.get("regime"), r.get("view"))), _ms(r)
            r["speedup_vs_baseline"] = b / ms if b and ms else None
