rule estimate:
    input:
        # ancient: a replaced source reruns the jobs that read it (their own inputs), not its
        # estimate; Snakemake skips a job whose only rerun reason would be an ancient input
        # from a rerunning job, so a rerun estimate would hide the replaced source from them
        betas=lambda wildcards: ancient(betas_source(wildcards)),
        masks=subject_roi_masks,
    output:
        outputs.SESSION_ESTIMATE,
    log:
        "logs/{subject}/estimate/session{session}.log",
    benchmark:
        "results/benchmarks/{subject}/estimate/session{session}.tsv"
    conda:
        "../envs/nsdzarr.yaml"
    resources:
        mem_mb=estimate_mem_mb,
        runtime=estimate_runtime,
    params:
        storage=config["storage"],
        # the ROI jobs' part stores are shaped by it, so their memory too
        roi_storage=config["roi_storage"],
        ceiling_mb=config["memory"]["ceiling_mb"],
        factor=config["memory"]["factor"],
        rois=subject_rois,
    script:
        "../scripts/estimate.py"
