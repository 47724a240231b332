rule convert:
    input:
        betas=betas_files,
        estimate=convert_estimate,
        affine_from=affine_source,
    output:
        directory(outputs.SESSION_STORE),
    log:
        "logs/{subject}/convert/session{session}.log",
    benchmark:
        "results/benchmarks/{subject}/convert/session{session}.tsv"
    conda:
        "../envs/nsdzarr.yaml"
    threads: 2
    resources:
        mem_mb=job_mem("convert"),
        runtime=job_runtime("convert"),
    params:
        storage=config["storage"],
    script:
        "../scripts/convert.py"
