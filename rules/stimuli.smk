# Only included when the stimulus store is enabled (stimuli.enabled, common.smk).


localrules:
    stimuli_estimate,


rule stimuli_estimate:
    input:
        source=stimuli_hdf5,
        trials=stimuli_trials,
    output:
        outputs.STIMULI_ESTIMATE,
    log:
        "logs/stimuli/estimate.log",
    conda:
        "../envs/nsdzarr.yaml"
    params:
        sizes=config["stimuli"]["sizes"],
        storage=stimuli_storage(),
        ceiling_mb=config["memory"]["ceiling_mb"],
        factor=config["memory"]["factor"],
    script:
        "../scripts/stimuli_estimate.py"


rule stimuli:
    input:
        source=stimuli_hdf5,
        trials=stimuli_trials,
        estimate=outputs.STIMULI_ESTIMATE,
    output:
        directory(outputs.STIMULI_STORE),
    log:
        "logs/stimuli/stimuli.log",
    benchmark:
        outputs.STIMULI_BENCHMARK
    conda:
        "../envs/nsdzarr.yaml"
    threads: 2
    resources:
        mem_mb=job_mem("stimuli"),
        runtime=job_runtime("stimuli"),
    params:
        sizes=config["stimuli"]["sizes"],
        storage=stimuli_storage(),
    script:
        "../scripts/stimuli.py"
