"""Snakemake adapter: the stimulus HDF5 -> sharded, verified Zarr v3 image store."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.stimuli import build_image_store
from nsdzarr.prepare.storage import StimuliStorage

run_job(
    snakemake.log[0],
    build_image_store,
    snakemake.input.source,
    snakemake.output[0],
    snakemake.input.estimate,
    trials=snakemake.input.trials or None,
    sizes=snakemake.params.sizes,
    settings=StimuliStorage.from_config(snakemake.params.storage),
    threads=snakemake.threads,
)
