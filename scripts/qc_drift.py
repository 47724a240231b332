"""Snakemake adapter: per-session mean and std of a subject's ROI betas (session drift)."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.qc import plot_session_drift

run_job(
    snakemake.log[0],
    plot_session_drift,
    dict(snakemake.input.items()),
    snakemake.output[0],
    snakemake.wildcards.subject,
)
