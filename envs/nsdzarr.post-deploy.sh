#!/usr/bin/env bash
# Run by `snakemake --sdm conda` inside the new env, once, after envs/nsdzarr.yaml is installed:
# installs the nsdzarr package of the checkout the workflow runs from (rules/common.smk sets
# NSDZARR_WORKFLOW_DIR), editable, without dependencies (the env file pins them all).
set -euo pipefail
: "${NSDZARR_WORKFLOW_DIR:?is not set: run this through snakemake --sdm conda}"
python -m pip install --quiet --no-deps --no-build-isolation --editable "$NSDZARR_WORKFLOW_DIR"
