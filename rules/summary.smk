rule estimate_summary:
    input:
        estimates=session_outputs("results/{subject}/estimates/session{session}.json"),
        # the heavy jobs whose benchmark files hold the measured peaks
        done=heavy_outputs(),
    output:
        tsv="results/summary/estimates.tsv",
        md="results/summary/estimates.md",
        png=report(
            "results/summary/memory_requested_vs_measured.png",
            caption="../report/memory.rst",
            category="Estimates",
        ),
    log:
        "logs/summary/estimate_summary.log",
    conda:
        "../envs/nsdzarr.yaml"
    params:
        benchmarks=benchmark_files,
    script:
        "../scripts/estimate_summary.py"
