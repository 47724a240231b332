rule estimate:
    input:
        betas=betas_source,
        masks=subject_roi_masks,
    output:
        "results/{subject}/estimates/session{session}.json",
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
