rule trial_index:
    input:
        design=design_mat,
        stim_info=stim_info_csv,
    output:
        trials=outputs.TRIALS_TSV,
        sidecar="results/{subject}/trials.json",
        images="results/{subject}/images.tsv",
    log:
        "logs/{subject}/trial_index.log",
    conda:
        "../envs/nsdzarr.yaml"
    params:
        sessions=lambda wildcards: sessions_of(wildcards.subject),
    script:
        "../scripts/trial_index.py"
