"""Snakemake adapter: size, memory and runtime estimate of the stimulus image store."""

from nsdzarr.prepare.estimate import write_stimuli_estimate
from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.storage import StimuliStorage

run_job(
    snakemake.log[0],
    write_stimuli_estimate,
    snakemake.input.source,
    snakemake.output[0],
    snakemake.input.trials or None,
    snakemake.params.sizes,
    StimuliStorage.from_config(snakemake.params.storage),
    ceiling_mb=snakemake.params.ceiling_mb,
    factor=snakemake.params.factor,
)
