# Light jobs: they read small stores and tables and run on the submitting host.
localrules:
    qc_stores,
    qc_trials,
    qc_drift,
    qc_reliability,


rule estimate_summary:
    input:
        estimates=session_outputs(outputs.SESSION_ESTIMATE),
        stimuli=[outputs.STIMULI_ESTIMATE] if STIMULI else [],
        # the heavy jobs whose benchmark files hold the measured peaks
        done=heavy_outputs(),
    output:
        tsv="results/summary/estimates.tsv",
        md="results/summary/estimates.md",
        png=report(
            "results/summary/memory_requested_vs_measured.png",
            caption="../report/memory.rst",
            category="Job resources",
        ),
        runtime_png=report(
            "results/summary/runtime_requested_vs_measured.png",
            caption="../report/runtime.rst",
            category="Job resources",
        ),
    log:
        "logs/summary/estimate_summary.log",
    conda:
        "../envs/nsdzarr.yaml"
    params:
        benchmarks=benchmark_files,
    script:
        "../scripts/estimate_summary.py"


rule qc_stores:
    input:
        estimates=subject_session_outputs(outputs.SESSION_ESTIMATE),
        stores=subject_session_outputs(outputs.SESSION_STORE),
    output:
        report(
            "results/summary/{subject}_store_sizes.png",
            caption="../report/store_sizes.rst",
            category="Stores",
            subcategory="{subject}",
        ),
    log:
        "logs/summary/{subject}_qc_stores.log",
    conda:
        "../envs/nsdzarr.yaml"
    script:
        "../scripts/qc_stores.py"


rule qc_trials:
    input:
        outputs.TRIALS_TSV,
    output:
        report(
            "results/summary/{subject}_trial_counts.png",
            caption="../report/trial_counts.rst",
            category="Stores",
            subcategory="{subject}",
        ),
    log:
        "logs/summary/{subject}_qc_trials.log",
    conda:
        "../envs/nsdzarr.yaml"
    script:
        "../scripts/qc_trials.py"


rule qc_drift:
    input:
        unpack(subject_roi_stores),
    output:
        report(
            "results/summary/{subject}_roi_session_drift.png",
            caption="../report/session_drift.rst",
            category="ROI quality",
            subcategory="{subject}",
        ),
    log:
        "logs/summary/{subject}_qc_drift.log",
    conda:
        "../envs/nsdzarr.yaml"
    script:
        "../scripts/qc_drift.py"


rule qc_reliability:
    input:
        store=outputs.ROI_STORE,
        trials=outputs.TRIALS_TSV,
        atlas=roi_mask,
    output:
        nifti="results/summary/{subject}_{roi}_reliability.nii.gz",
        hist=report(
            "results/summary/{subject}_{roi}_reliability_hist.png",
            caption="../report/reliability_hist.rst",
            category="ROI quality",
            subcategory="{subject}",
        ),
        slices=report(
            "results/summary/{subject}_{roi}_reliability_slices.png",
            caption="../report/reliability_slices.rst",
            category="ROI quality",
            subcategory="{subject}",
        ),
    log:
        "logs/summary/{subject}_{roi}_qc_reliability.log",
    conda:
        "../envs/nsdzarr.yaml"
    script:
        "../scripts/qc_reliability.py"
