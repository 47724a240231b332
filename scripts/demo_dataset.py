"""Snakemake adapter: generate the miniature NSD release."""

from nsdzarr.prepare.demo import DemoSpec, write_demo
from nsdzarr.prepare.jobs import run_job

run_job(snakemake.log[0], write_demo, snakemake.params.root, DemoSpec(**snakemake.params.spec))
