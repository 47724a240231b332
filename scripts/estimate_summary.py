"""Snakemake adapter: estimates table, Markdown report and requested-vs-measured plots."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.summary import write_summary

run_job(
    snakemake.log[0],
    write_summary,
    list(snakemake.input.estimates),
    snakemake.params.benchmarks,
    snakemake.output.tsv,
    snakemake.output.md,
    snakemake.output.png,
    snakemake.output.runtime_png,
    stimuli_estimate=next(iter(snakemake.input.stimuli), None),
)
