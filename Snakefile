from pathlib import Path

from snakemake.utils import min_version

min_version("9.14.1")


# The shipped config is the bare `snakemake` demo. A user's --configfile replaces it (it is not
# merged under it): what the user leaves out takes the schema's documented default.
if not workflow.overwrite_configfiles:

    configfile: Path(workflow.basedir) / "config" / "config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


if config["demo"]:

    include: "rules/demo.smk"


include: "rules/trials.smk"
include: "rules/estimate.smk"
include: "rules/convert.smk"
include: "rules/roi.smk"
include: "rules/summary.smk"


if STIMULI:

    include: "rules/stimuli.smk"


# Light jobs run on the submitting host, also under `--executor slurm`.
localrules:
    all,
    trial_index,
    roi_store,
    estimate_summary,


onsuccess:
    drop_engine_timestamps()


onerror:
    drop_engine_timestamps()


rule all:
    default_target: True
    input:
        final_outputs(),
        qc_outputs(),
