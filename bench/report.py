"""Turn a benchmark JSON into a Markdown table and a plot: either a pytest-benchmark JSON
(bench/test_bench.py) or the GPU check's gpu_check.json (bench/gpu_check.py).

    pytest bench --benchmark-only --benchmark-json results.json
    python bench/report.py results.json --out-dir bench/out
    python bench/report.py OUT/gpu_check.json --out-dir bench/out

Writes DIR/results.md (also printed) and DIR/results.png (needs matplotlib;
without it the plot is skipped with a message). Every figure comes from the
JSON: time per step is the median call divided by the call's steps_per_call,
GB/s counts one read of X and T per step (the performance brief), and the speedup
is recomputed against the group's baseline peer found in the same file.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    group: str
    peer: str
    baseline: bool
    time_per_step: float  # seconds
    gbps: float | None
    copy_gbps: float | None
    speedup: float | None
    peak_extra_bytes: int | None
    peak_bytes: int | None
    check: str
    timing: str  # how the figure was taken: "N rounds" (pytest-benchmark) or gpu_check's timer
    info: dict[str, Any]
    view: str = "cold"  # gpu_check: "cold" (do_bench, L2 flushed) or "steady" (back-to-back loop, one sync)

    @property
    def frac_copy(self) -> float | None:
        if self.gbps is None or not self.copy_gbps:
            return None
        return self.gbps / self.copy_gbps


def load_rows(path: Path) -> tuple[list[Row], dict[str, Any]]:
    """Rows in run order, with speedups recomputed per group from the JSON's own baseline;
    and the machine (a dict with device, torch, triton, cuda, cpu)."""
    doc = json.loads(path.read_text())
    if "benchmarks" in doc:
        rows, machine = _pytest_benchmark_rows(doc)
    elif "rows" in doc and "meta" in doc:
        rows, machine = _gpu_check_rows(doc)
    else:
        raise ValueError(f"{path}: neither a pytest-benchmark JSON nor a gpu_check.json")
    base = {(r.group, r.view): r.time_per_step for r in rows if r.baseline}
    for r in rows:
        if (r.group, r.view) in base:
            r.speedup = base[(r.group, r.view)] / r.time_per_step
    return rows, machine


def _gbps(n_bytes: int | None, per_step: float) -> float | None:
    return n_bytes / per_step / 1e9 if n_bytes and per_step > 0 else None


def _pytest_benchmark_rows(doc: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    rows: list[Row] = []
    for bench in doc.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench.get("stats") or {}
        if "median" not in stats:
            continue
        per_step = stats["median"] / (info.get("steps_per_call") or 1)
        rows.append(Row(
            group=bench.get("group") or "(no group)", peer=info.get("peer", bench.get("name", "?")),
            baseline=bool(info.get("baseline")), time_per_step=per_step, gbps=_gbps(info.get("bytes_per_step"), per_step),
            copy_gbps=info.get("copy_gbps"), speedup=None, peak_extra_bytes=info.get("peak_extra_bytes"),
            peak_bytes=info.get("peak_mem_bytes"), check=_check_text(info),
            timing=f"{int(stats.get('rounds', 0))} rounds", info=info))
    return rows, doc.get("machine_info", {}).get("linreg_fused_bench", {})


def _gpu_check_rows(doc: dict[str, Any]) -> tuple[list[Row], dict[str, Any]]:
    """Timed rows of either layout: the sections' rows (measure "time" / "steady", one per view,
    bench/check_ctx.py) or the earlier single script's (section "timing", do_bench only)."""
    meta = doc["meta"]
    copy = (meta.get("ceilings") or {}).get("copy_gbps") or meta.get("copy_gbps")
    rows: list[Row] = []
    for row in doc["rows"]:
        old = row.get("section") == "timing" and "ms_per_step" in row
        # A section's own timed rows may carry a regime without a peer (e.g. a kernel formulation): its name says which.
        new = row.get("measure") in ("time", "steady") and row.get("regime") and row.get("status") == "ok"
        if not (old or new):
            continue
        per_step = row["ms_per_step"] * 1e-3
        rows.append(Row(
            group=row["group"] if old else row["regime"], peer=row.get("peer") or row["name"], baseline=bool(row.get("baseline")),
            time_per_step=per_step, gbps=_gbps(row.get("bytes_per_step"), per_step),
            copy_gbps=row.get("copy_gbps") or copy, speedup=None, peak_extra_bytes=row.get("peak_extra_bytes"),
            peak_bytes=row.get("peak_mem_bytes"), check=_check_text(row), timing=row.get("timer", "do_bench median"),
            info=row, view=row.get("view", "cold")))
    cpu = meta.get("mode") != "gpu"
    machine = {"device": meta.get("gpu") or f"CPU ({meta.get('cpu', '?')})", "torch": meta.get("torch"),
               "triton": meta.get("triton"), "cuda": meta.get("cuda_runtime"), "cpu": cpu,
               "date": meta.get("date_utc"), "commit": meta.get("commit_given") or meta.get("git_commit")}
    return rows, machine


def _target_text(info: dict[str, Any]) -> str:
    t = info.get("target")
    if not t:
        return ""
    value = t.get("value")
    shown = "—" if value is None else (f"{100 * value:.0f}%" if t.get("unit") == "%" else
                                      f"{value:.3g} us" if t.get("unit") == "us" else f"{value:.2f}×")
    verdict = {True: "pass", False: "FAIL", None: "n/a"}[t.get("pass")]
    return f"{verdict}: {shown} ({t.get('goal')})"


def _check_text(info: dict[str, Any]) -> str:
    if "check_output_rel_err" in info:
        return f"out {info['check_output_rel_err']:.1e}"
    if "check_loss_rel_err" in info:
        return f"loss {info['check_loss_rel_err']:.1e}, upd {info.get('check_update_rel_err', float('nan')):.1e}"
    return ""


def fmt_time(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "—"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _num(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None or not math.isfinite(v) else f"{v:{spec}}{suffix}"


def groups_in_order(rows: list[Row]) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        out.setdefault(r.group, []).append(r)
    for g in out.values():
        g.sort(key=lambda r: not r.baseline)  # baseline first, otherwise run order
    return out


def markdown(rows: list[Row], env: dict[str, Any], source: Path) -> str:
    lines = ["# linreg-fused benchmarks", "",
             f"Source: `{source.name}`; device: {env.get('device', '?')}; torch {env.get('torch', '?')}, "
             f"triton {env.get('triton', '?')}" + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
             + (f"; commit {str(env['commit'])[:12]}" if env.get("commit") else "")
             + (f"; {env['date']} UTC" if env.get("date") else "") + "."]
    copy = next((r.copy_gbps for r in rows if r.copy_gbps), None)
    if copy:
        lines.append(f"Copy ceiling measured in the same run: {copy:,.1f} GB/s (bytes read + written).")
    if env.get("cpu"):
        lines += ["", "**CPU figures** (reference backend and Triton's interpreter on tiny shapes): they check "
                  "that the harness runs; they say nothing about GPU performance."]
    lines += ["", "Time per step = median call / steps per call. GB/s counts one read of X and T per step "
              "(inference: X read, Y written). Speedup is over the group's eager baseline (first row). "
              "Check: relative error against float64 before timing.", ""]
    views = any(r.view == "steady" for r in rows)
    if views:
        lines += ["Two views per peer: **cold** (do_bench median of one call, L2 flushed) and **steady** (100 "
                  "back-to-back steps, or a fit call of many, one synchronize at the end: what training sees). "
                  "Speedup compares like views. Target: the project's goal for that figure (bench/targets.py).", ""]
    for group, grp in groups_in_order(rows).items():
        lines += [f"## {group}", "",
                  "| peer | view | time / step | GB/s | % of copy | speedup vs eager | peak extra memory | timing | check "
                  "| target |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in grp:
            name = f"**{r.peer}** (baseline)" if r.baseline else r.peer
            frac = None if r.frac_copy is None else 100 * r.frac_copy
            lines.append(f"| {name} | {r.view} | {fmt_time(r.time_per_step)} | {_num(r.gbps, ',.4g')} "
                         f"| {_num(frac, '.3g', '%')} | {_num(r.speedup, '.3g', '×')} | {fmt_bytes(r.peak_extra_bytes)} "
                         f"| {r.timing} | {r.check} | {_target_text(r.info)} |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[Row], out: Path, title: str) -> str | None:
    """Two panels: speedup over eager, and achieved GB/s against the copy ceiling. Returns a
    message instead when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'linreg-fused[plot]'): plot skipped"
    groups = groups_in_order(rows)
    views = any(r.view == "steady" for r in rows)

    def bar_label(r: Row) -> str:
        return f"{r.peer} ({r.view})" if views else r.peer

    peers: list[str] = []
    for grp in groups.values():
        peers += [bar_label(r) for r in grp if bar_label(r) not in peers]
    cmap = plt.get_cmap("tab20")
    colors = {p: cmap(i % 20) for i, p in enumerate(peers)}
    fig, axes = plt.subplots(2, 1, figsize=(max(10.0, 1.3 * len(groups) + 5), 10), constrained_layout=True)
    width = 0.8 / max(1, max(len(g) for g in groups.values()))
    for ax, metric, label in ((axes[0], "speedup", "speedup over eager (×, log)"),
                              (axes[1], "gbps", "achieved GB/s (log)")):
        for gi, grp in enumerate(groups.values()):
            for pi, r in enumerate(grp):
                v = getattr(r, metric)
                if v is None or v <= 0:
                    continue
                ax.bar(gi + (pi - (len(grp) - 1) / 2) * width, v, width, color=colors[bar_label(r)],
                       label=bar_label(r) if bar_label(r) not in ax.get_legend_handles_labels()[1] else None)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(list(groups), rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", which="both", alpha=0.3)
    axes[0].axhline(1.0, color="black", linewidth=0.8)
    copy = next((r.copy_gbps for r in rows if r.copy_gbps), None)
    if copy:
        axes[1].axhline(copy, color="red", linestyle="--", linewidth=1, label=f"copy ceiling {copy:,.0f} GB/s")
    # One legend for both panels, outside them, so no bar is hidden behind it.
    handles, labels = {}, []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    fig.legend([handles[lab] for lab in labels], labels, loc="outside right upper", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="pytest-benchmark --benchmark-json file")
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    try:
        rows, env = load_rows(args.results)
    except ValueError as err:
        print(err, file=sys.stderr)
        return 1
    if not rows:
        print(f"{args.results}: no timed benchmarks in this file (run with --benchmark-only)", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, env, args.results)
    (args.out_dir / "results.md").write_text(text + "\n")
    print(text)
    title = f"linreg-fused on {env.get('device', '?')}" + (" (CPU figures: not GPU performance)" if env.get("cpu") else "")
    message = plot(rows, args.out_dir / "results.png", title)
    print(message or f"\nwrote {args.out_dir / 'results.md'} and {args.out_dir / 'results.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
