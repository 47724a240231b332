"""Snakemake adapter: size and memory estimate of one session."""

from nsdzarr.prepare.estimate import write_session_estimate
from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.storage import StorageSettings

run_job(
    snakemake.log[0],
    write_session_estimate,
    snakemake.input.betas,
    snakemake.output[0],
    StorageSettings.from_config(snakemake.params.storage),
    ceiling_mb=snakemake.params.ceiling_mb,
    factor=snakemake.params.factor,
    rois=snakemake.params.rois,
    roi_storage=StorageSettings.from_config(snakemake.params.roi_storage),
)
