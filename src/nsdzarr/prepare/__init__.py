"""Preparing data: HDF5/NIfTI reads, conversion to Zarr, estimates and the memory model, trial
tables, ROI and stimuli stores, the demo release and the QC summary. Run by the workflow's scripts.
"""
