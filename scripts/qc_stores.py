"""Snakemake adapter: a subject's session store sizes, compression ratios and file counts."""

import sys

sys.path.insert(0, f"{snakemake.scriptdir}/../src")

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.qc import write_store_sizes

run_job(
    snakemake.log[0],
    write_store_sizes,
    list(snakemake.input.estimates),
    list(snakemake.input.stores),
    snakemake.output[0],
)
