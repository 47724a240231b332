# Only included with `demo: true`: the miniature NSD release the default config runs on.


localrules:
    demo_dataset,


rule demo_dataset:
    output:
        [str(p) for p in demo_files(NSD_ROOT, demo_spec())],
    log:
        "logs/demo_dataset.log",
    conda:
        "../envs/nsdzarr.yaml"
    params:
        root=lambda wildcards, output: layout.root_of_design(output[0]),
        spec=lambda wildcards: vars(demo_spec()),
    script:
        "../scripts/demo_dataset.py"
