"""Snakemake adapter: trial -> image index tables of one subject."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.trials import write_trial_tables

run_job(
    snakemake.log[0],
    write_trial_tables,
    snakemake.input.design,
    snakemake.wildcards.subject,
    snakemake.params.sessions,
    snakemake.output.trials,
    snakemake.output.sidecar,
    snakemake.output.images,
    stim_info_csv=next(iter(snakemake.input.stim_info), None),
)
