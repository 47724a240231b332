"""Snakemake adapter: a subject's trial counts per session and split."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.qc import plot_trial_counts

run_job(
    snakemake.log[0],
    plot_trial_counts,
    snakemake.input[0],
    snakemake.output[0],
    snakemake.wildcards.subject,
)
