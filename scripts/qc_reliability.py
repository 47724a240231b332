"""Snakemake adapter: split-half reliability of one ROI store (NIfTI, histogram, slices)."""

from nsdzarr.prepare.jobs import run_job
from nsdzarr.prepare.qc import write_roi_reliability

run_job(
    snakemake.log[0],
    write_roi_reliability,
    snakemake.input.store,
    snakemake.input.trials,
    snakemake.input.atlas,
    snakemake.wildcards.subject,
    snakemake.wildcards.roi,
    snakemake.output.nifti,
    snakemake.output.hist,
    snakemake.output.slices,
)
