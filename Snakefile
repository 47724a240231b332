from snakemake.utils import min_version

min_version("9.14.1")


configfile: "config/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"


if config["demo"]:

    include: "rules/demo.smk"


include: "rules/trials.smk"
include: "rules/estimate.smk"
include: "rules/convert.smk"
include: "rules/roi.smk"
include: "rules/summary.smk"


# Light jobs run on the submitting host, also under `--executor slurm`.
localrules:
    all,
    trial_index,
    roi_store,
    estimate_summary,


rule all:
    default_target: True
    input:
        final_outputs(),
