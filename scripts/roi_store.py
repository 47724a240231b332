"""Snakemake adapter: assemble a subject's ROI store from its per-session parts."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.roi import finish_store
from nsdzarr.prepare.storage import StorageSettings

run_job(
    snakemake.log[0],
    finish_store,
    list(snakemake.input.parts),
    snakemake.params.sessions,
    snakemake.input.mask,
    snakemake.params.labels,
    snakemake.output[0],
    StorageSettings.from_config(snakemake.params.storage),
)
