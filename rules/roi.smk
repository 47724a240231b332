rule roi_session:
    input:
        betas=betas_source,
        mask=roi_mask,
        trials=outputs.TRIALS_TSV,
        # sizes the job only: a newer estimate (e.g. for a new ROI) reruns nothing
        estimate=ancient(outputs.SESSION_ESTIMATE),
        # the atlas whose affine the session stores record: every mask must share it
        affine_from=affine_source,
    output:
        # kept: a replaced session source rebuilds its part alone, then the store links them
        directory(outputs.ROI_PART),
    log:
        "logs/{subject}/roi_session/{roi}_session{session}.log",
    benchmark:
        "results/benchmarks/{subject}/roi_session/{roi}_session{session}.tsv"
    conda:
        "../envs/nsdzarr.yaml"
    resources:
        mem_mb=job_mem("roi_session/{roi}"),
        runtime=job_runtime("roi_session/{roi}"),
    params:
        labels=roi_labels,
        storage=config["roi_storage"],
    script:
        "../scripts/roi_session.py"


rule roi_store:
    input:
        parts=roi_parts,
        mask=roi_mask,
    output:
        directory(outputs.ROI_STORE),
    log:
        "logs/{subject}/roi_store/{roi}.log",
    conda:
        "../envs/nsdzarr.yaml"
    params:
        sessions=lambda wildcards: sessions_of(wildcards.subject),
        labels=roi_labels,
        storage=config["roi_storage"],
    script:
        "../scripts/roi_store.py"
