"""Snakemake adapter: one session HDF5 -> sharded Zarr v3 store."""

from nsdzarr.prepare.convert import convert_session
from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.memory import budget_bytes
from nsdzarr.prepare.nifti import nifti_affine
from nsdzarr.prepare.storage import StorageSettings

run_job(
    snakemake.log[0],
    convert_session,
    snakemake.input.betas,
    snakemake.output[0],
    StorageSettings.from_config(snakemake.params.storage),
    memory_budget_bytes=budget_bytes(snakemake.resources.mem_mb),
    affine=nifti_affine(next(iter(snakemake.input.affine_from), None)),
    threads=snakemake.threads,
)
