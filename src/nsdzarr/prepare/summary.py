"""Summaries of the estimates: per session, per subject, dataset totals, requested vs measured."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from nsdzarr.outputs import SESSION_ESTIMATE_FILE, STIMULI_BENCHMARK_FILE
from nsdzarr.prepare.atomic import atomic_output
from nsdzarr.prepare.figures import new_figure, no_data, save_png
from nsdzarr.prepare.memory import MB

BENCH_FILE = re.compile(r"(subj\d+)/(\w+)/(?:(.+)_)?session(\d+)\.tsv$")
COLUMNS = [
    "subject",
    "session",
    "shape",
    "raw_mb",
    "float32_mb",
    "source_mb",
    "store_mb",
    "store_files",
    "convert_strategy",
    "convert_mem_mb",
    "max_job_mem_mb",
]


def session_rows(estimate_files: list[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """One summary row per session estimate file."""
    rows = []
    for path in sorted(map(str, estimate_files)):
        m = SESSION_ESTIMATE_FILE.search(Path(path).as_posix())
        est = json.loads(Path(path).read_text())
        jobs = est["jobs"]
        rows.append(
            {
                "subject": m[1] if m else "?",
                "session": int(m[2]) if m else 0,
                "shape": "x".join(map(str, est["source"]["shape"])),
                "raw_mb": est["raw_bytes"] / MB,
                "float32_mb": est["float32_bytes"] / MB,
                "source_mb": est["source"]["file_bytes"] / MB,
                "store_mb": est["store_bytes"] / MB,
                "store_files": est["store_files"],
                "convert_strategy": jobs["convert"]["strategy"],
                "convert_mem_mb": jobs["convert"]["mem_mb"],
                "max_job_mem_mb": max(j["mem_mb"] for j in jobs.values()),
            }
        )
    return rows


def totals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per subject and whole-dataset totals: what naive loading costs vs what our jobs need."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["subject"], []).append(row)
    groups["all"] = rows
    return [
        {
            "scope": scope,
            "sessions": len(rs),
            "one_session_in_ram_mb": max(r["raw_mb"] for r in rs),
            "all_sessions_int16_in_ram_mb": sum(r["raw_mb"] for r in rs),
            "all_sessions_float32_in_ram_mb": sum(r["float32_mb"] for r in rs),
            "source_mb": sum(r["source_mb"] for r in rs),
            "stores_mb": sum(r["store_mb"] for r in rs),
            "store_files": sum(r["store_files"] for r in rs),
            "largest_job_request_mb": max(r["max_job_mem_mb"] for r in rs),
        }
        for scope, rs in groups.items()
        if rs
    ]


def stimuli_row(estimate_file: str | os.PathLike[str]) -> dict[str, Any]:
    """The summary row of the stimulus image store's estimate."""
    est = json.loads(Path(estimate_file).read_text())
    job = est["jobs"]["stimuli"]
    return {
        "images": est["n_images"],
        "source_shape": "x".join(map(str, est["source"]["shape"])),
        "sizes": ",".join(map(str, est["sizes"])) or "-",
        "raw_mb": est["raw_bytes"] / MB,
        "store_mb": est["store_bytes"] / MB,
        "store_files": est["store_files"],
        "mem_mb": job["mem_mb"],
        "runtime_min": job["runtime_min"],
    }


def measured_peaks(
    estimate_files: list[str | os.PathLike[str]],
    benchmark_files: list[str | os.PathLike[str]],
    stimuli_estimate: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Requested vs measured memory (MB) and runtime of every job with a benchmark file."""
    estimates = {}
    for path in estimate_files:
        m = SESSION_ESTIMATE_FILE.search(Path(path).as_posix())
        if m:
            estimates[(m[1], int(m[2]))] = json.loads(Path(path).read_text())["jobs"]
    if stimuli_estimate:
        estimates["stimuli"] = json.loads(Path(stimuli_estimate).read_text())["jobs"]
    out = []
    for path in sorted(map(str, benchmark_files)):
        if STIMULI_BENCHMARK_FILE.search(Path(path).as_posix()):
            # labelled like the session jobs ("subject job session") for the plots' axes
            subject, job, session, jobs = "all", "stimuli", None, estimates.get("stimuli", {})
        elif m := BENCH_FILE.search(Path(path).as_posix()):
            subject, rule, roi, session = m[1], m[2], m[3], int(m[4])
            job = f"{rule}/{roi}" if roi else rule
            jobs = estimates.get((subject, session), {})
        else:
            continue
        with open(path, newline="") as fh:
            bench = list(csv.DictReader(fh, delimiter="\t"))
        if job not in jobs or not bench:
            continue
        out.append(
            {
                "job": f"{subject} {job} " + ("-" if session is None else f"session{session:02d}"),
                "requested_mb": jobs[job]["mem_mb"],
                "predicted_peak_mb": jobs[job]["peak_bytes"] / MB,
                "measured_max_rss_mb": max(float(b["max_rss"]) for b in bench),
                "requested_runtime_min": jobs[job]["runtime_min"],
                "measured_runtime_s": max(float(b["s"]) for b in bench),
            }
        )
    return out


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub-style Markdown table of dict rows."""
    if not rows:
        return "_none_\n"
    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_fmt(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_tsv(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write dict rows as TSV, atomically."""
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, delimiter="\t")
        writer.writeheader()
        writer.writerows({k: _fmt(v) for k, v in r.items()} for r in rows)


def _job_axis(ax: Any, peaks: list[dict[str, Any]]) -> np.ndarray:
    """One x position per job, labelled "rule s01" while they stay readable."""
    x = np.arange(len(peaks))
    if len(peaks) <= 40:
        # "subj01 roi_session/V1 session02" -> "roi_session/V1 s02"
        labels = [
            f"{job} s{session.removeprefix('session')}" if session != "-" else job
            for _subject, job, session in (p["job"].split(" ") for p in peaks)
        ]
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel(f"job ({len(peaks)}, by rule and session)")
    return x


def plot_requested_vs_measured(peaks: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Per job: requested mem_mb, the model's predicted peak and the measured peak RSS."""
    fig, ax = new_figure(9, 5.5)
    if peaks:
        x = _job_axis(ax, peaks)
        ax.plot(x, [p["requested_mb"] for p in peaks], "v", ms=8, label="requested mem_mb")
        ax.plot(
            x,
            [p["predicted_peak_mb"] for p in peaks],
            "o",
            mfc="none",
            ms=8,
            label="predicted peak of the job's script",
        )
        ax.plot(
            x,
            [p["measured_max_rss_mb"] for p in peaks],
            "o",
            ms=6,
            label="measured peak RSS (Snakemake benchmark)",
        )
        ax.set_ylim(0, max(p["requested_mb"] for p in peaks) * 1.15)
        fig.legend(loc="outside lower center", ncols=3)
    else:
        no_data(ax, "no benchmark files yet")
    ax.set_ylabel("memory (MB)")
    ax.set_title("Memory requested vs measured per job")
    save_png(fig, path)


def plot_runtime_requested_vs_measured(
    peaks: list[dict[str, Any]], path: str | os.PathLike[str]
) -> None:
    """Per job: the requested runtime against the wall time its benchmark file measured."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    fig, ax = new_figure(9, 5.5)
    if peaks:
        x = _job_axis(ax, peaks)
        ax.plot(
            x,
            [p["requested_runtime_min"] * 60 for p in peaks],
            "v",
            ms=8,
            label="requested runtime",
        )
        ax.plot(
            x,
            [max(p["measured_runtime_s"], 0.01) for p in peaks],
            "o",
            ms=6,
            label="measured wall time (Snakemake benchmark)",
        )
        ax.set_yscale("log")
        # headroom above the requests, and labels at 1-2-5 steps (decades alone say little)
        ax.set_ylim(top=max(p["requested_runtime_min"] * 60 for p in peaks) * 2)
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        fig.legend(loc="outside lower center", ncols=2)
    else:
        no_data(ax, "no benchmark files yet")
    ax.set_ylabel("runtime (s, log scale)")
    ax.set_title("Runtime requested vs measured per job")
    save_png(fig, path)


def write_summary(
    estimate_files: list[str | os.PathLike[str]],
    benchmark_files: list[str | os.PathLike[str]],
    out_tsv: str | os.PathLike[str],
    out_md: str | os.PathLike[str],
    out_png: str | os.PathLike[str],
    out_runtime_png: str | os.PathLike[str],
    stimuli_estimate: str | os.PathLike[str] | None = None,
) -> None:
    """Write the estimates table (TSV), its Markdown report and the requested-vs-measured plots."""
    rows = session_rows(estimate_files)
    peaks = measured_peaks(estimate_files, benchmark_files, stimuli_estimate)
    write_tsv(rows, out_tsv)
    text = (
        "# Size and memory estimates\n\n## Totals\n\n"
        + markdown_table(totals(rows))
        + "\n## Sessions\n\n"
        + markdown_table(rows)
        + (
            "\n## Stimulus images\n\n" + markdown_table([stimuli_row(stimuli_estimate)])
            if stimuli_estimate
            else ""
        )
        + "\n## Requested vs measured memory and runtime per job\n\n"
        + markdown_table(peaks)
    )
    with atomic_output(out_md) as tmp:
        Path(tmp).write_text(text)
    plot_requested_vs_measured(peaks, out_png)
    plot_runtime_requested_vs_measured(peaks, out_runtime_png)
