"""Snakemake adapter: a subject's session store sizes, compression ratios and file counts."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.qc import write_store_sizes

run_job(
    snakemake.log[0],
    write_store_sizes,
    list(snakemake.input.estimates),
    list(snakemake.input.stores),
    snakemake.output[0],
)
