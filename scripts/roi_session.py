"""Snakemake adapter: one session's rows of one ROI store."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.roi import extract_session
from nsdzarr.prepare.storage import StorageSettings

run_job(
    snakemake.log[0],
    extract_session,
    snakemake.input.betas,
    snakemake.input.mask,
    snakemake.params.labels,
    snakemake.input.trials,
    int(snakemake.wildcards.session),
    snakemake.output[0],
    StorageSettings.from_config(snakemake.params.storage),
    reference=next(iter(snakemake.input.affine_from), None),
)
