# Config validation, path helpers and resource functions. Functions only: rules live elsewhere.
import functools
import os
import re
import sys
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Paths relative to this file, not workflow.basedir: used as a Snakemake module, basedir is
# the caller's folder.
RULES_DIR = Path(workflow.current_basedir)

# The rules and scripts import the installed package (never this checkout's src/ by path).
try:
    import nsdzarr
except ModuleNotFoundError as err:
    if err.name != "nsdzarr":
        raise
    raise WorkflowError(
        f"the nsdzarr package is not installed for {sys.executable}: "
        f"run `pip install -e {RULES_DIR.parent}` first"
    ) from None

# `--sdm conda`: envs/nsdzarr.post-deploy.sh installs this checkout into the rules' env.
os.environ.update(NSDZARR_WORKFLOW_DIR=str(RULES_DIR.parent))

# Only light modules here: every Snakemake process, also the one inside each SLURM job,
# imports them, and their memory counts against the job's request.
from nsdzarr import outputs
from nsdzarr.prepare import layout
from nsdzarr.errors import InputError
from nsdzarr.prepare.provenance import require_demo_target, require_same_release
from nsdzarr.prepare.demo_spec import DemoSpec, demo_files
from nsdzarr.prepare.resources import (
    estimate_job_mem_mb,
    estimate_job_runtime_min,
    job_mem_mb,
    job_runtime_min,
)

# Errors about the settings name the config file(s) they came from, on one line.
CONFIG_FILES = ", ".join(str(f) for f in workflow.configfiles) or "config"

try:
    validate(config, RULES_DIR.parent / "config" / "schema.yaml")
except WorkflowError as err:
    problem = err.__context__  # the jsonschema ValidationError
    if not hasattr(problem, "json_path"):
        raise
    raise WorkflowError(
        f"{CONFIG_FILES}: {problem.json_path}: {problem.message}"
    ) from None

if config["storage"]["trials_per_shard"] % config["storage"]["trials_per_chunk"]:
    raise WorkflowError(
        f"{CONFIG_FILES}: storage.trials_per_chunk "
        f"({config['storage']['trials_per_chunk']}) must divide storage.trials_per_shard "
        f"({config['storage']['trials_per_shard']})"
    )

for _folder in ("results", "logs"):
    if Path(_folder).exists() and not Path(_folder).is_dir():
        raise WorkflowError(
            f"{Path(_folder).resolve()}: output folder is not a directory (move the file away)"
        )
    if Path(_folder).is_dir() and not os.access(_folder, os.W_OK | os.X_OK):
        raise WorkflowError(
            f"{Path(_folder).resolve()}: output folder is not writable (permission denied)"
        )

NSD_ROOT = config["nsd_root"]
SURFACE = layout.is_surface(config["space"])
SUBJECTS = config["subjects"]

# Before any job: the demo never writes into a folder it did not create, and outputs of
# another release (another nsd_root) never mix with this one's, nor set its jobs' memory.
try:
    if config["demo"]:
        require_demo_target(NSD_ROOT)
    require_same_release("results", NSD_ROOT)
except InputError as err:
    raise WorkflowError(str(err)) from None


def drop_engine_timestamps():
    """Remove the `.snakemake_timestamp` files Snakemake leaves in directory() outputs.

    zarr-python warns about any foreign file inside a store; without the file, Snakemake
    takes the store folder's own mtime, which is kept as the stamp made it (removing an entry
    would move it past the outputs made from the store, and rerun them).
    """
    for stamp in Path("results").rglob(".snakemake_timestamp"):
        folder = stamp.parent.stat()
        stamp.unlink(missing_ok=True)
        os.utime(stamp.parent, ns=(folder.st_atime_ns, folder.st_mtime_ns))


wildcard_constraints:
    subject=r"subj\d{2}",
    session=r"\d{2}",
    # only the configured ROIs (names are [A-Za-z0-9_-]+ by the schema)
    roi="|".join(config["rois"]) or "(?!)",


def demo_spec():
    """The demo release to generate, shaped by the configured subjects and sessions."""
    sessions = config["sessions"]
    n = DemoSpec.sessions if sessions == "all" else max(sessions)
    return DemoSpec(
        subjects=tuple(SUBJECTS),
        sessions=n,
        space=config["space"],
        beta_version=config["beta_version"],
    )


def converted_sessions(subject):
    """Session numbers whose store is in results/ (their HDF5 may since have been deleted)."""
    names = (p.name for p in Path(f"results/{subject}/betas").glob("session*.zarr"))
    return sorted(
        int(m[1]) for n in names if (m := re.fullmatch(r"session(\d{2})\.zarr", n))
    )


@functools.cache
def sessions_of(subject):
    """Session numbers configured for a subject (`all` = files present, or the demo's; a
    converted session whose HDF5 was deleted still counts)."""
    stored = [] if config["demo"] else converted_sessions(subject)
    if config["sessions"] != "all":
        sessions = sorted(config["sessions"])
        if not config["demo"]:
            for s in sessions:
                for path in layout.session_sources(
                    NSD_ROOT, subject, config["space"], config["beta_version"], s
                ):
                    if not path.is_file() and s not in stored:
                        raise WorkflowError(
                            f"{path}: betas file not found (session {s} is listed in "
                            "config sessions)"
                        )
        return sessions
    if config["demo"]:
        return list(range(1, demo_spec().sessions + 1))
    try:
        present = layout.sessions_present(
            NSD_ROOT, subject, config["space"], config["beta_version"]
        )
    except InputError as err:
        if not stored:
            raise WorkflowError(str(err)) from None
        present = []
    return sorted(set(present) | set(stored))


def betas_hdf5(wildcards):
    """The source HDF5 of one session."""
    return layout.betas_path(
        NSD_ROOT,
        wildcards.subject,
        config["space"],
        config["beta_version"],
        int(wildcards.session),
    )


def betas_files(wildcards):
    """The source file of one session, or its [lh, rh] files in a surface space."""
    paths = layout.session_sources(
        NSD_ROOT,
        wildcards.subject,
        config["space"],
        config["beta_version"],
        int(wildcards.session),
    )
    return [str(p) for p in paths] if SURFACE else str(paths[0])


def session_store(wildcards):
    """The converted store of one session."""
    return outputs.SESSION_STORE.format(
        subject=wildcards.subject, session=wildcards.session
    )


def has_hdf5(wildcards):
    """Whether the session's HDF5 is there (or, in the demo, will be generated)."""
    return config["demo"] or betas_hdf5(wildcards).exists()


def betas_source(wildcards):
    """Where a session's betas are read from: the HDF5, or its converted store once the HDF5
    has been deleted (ROIs added later are extracted from the store)."""
    return betas_files(wildcards) if has_hdf5(wildcards) else session_store(wildcards)


def convert_estimate(wildcards):
    """The estimate sizing a conversion; none without the HDF5 (the job cannot run then, and
    the estimate, made from the store, must not depend on the store's own job)."""
    estimate = outputs.SESSION_ESTIMATE.format(
        subject=wildcards.subject, session=wildcards.session
    )
    # ancient: it sizes the job only, so a newer estimate (a new ROI) reruns nothing
    return ancient(estimate) if has_hdf5(wildcards) else []


def design_mat(wildcards=None):
    """The experimental design file of the release."""
    return layout.design_path(NSD_ROOT)


def session_outputs(pattern):
    """`pattern` expanded over every configured subject and session."""
    return [
        pattern.format(subject=subject, session=f"{session:02d}")
        for subject in SUBJECTS
        for session in sessions_of(subject)
    ]


def final_outputs():
    """Everything `rule all` requests."""
    return (
        heavy_outputs()
        + expand(outputs.TRIALS_TSV, subject=SUBJECTS)
        + ["results/summary/estimates.tsv"]
        + qc_outputs()
    )


def stimuli_hdf5(wildcards=None):
    """The release's stimulus file (`imgBrick`)."""
    return str(layout.stimuli_path(NSD_ROOT))


def stimuli_enabled():
    """Whether to build the image store: `auto` = the stimulus file exists (or the demo)."""
    enabled = config["stimuli"]["enabled"]
    present = config["demo"] or Path(stimuli_hdf5()).is_file()
    if enabled is True and not present:
        raise WorkflowError(
            f"{stimuli_hdf5()}: stimulus file not found (stimuli.enabled is true; "
            "set it to auto or false to go without images)"
        )
    return present if enabled == "auto" else enabled


def stimuli_trials(wildcards=None):
    """The trial tables whose images the store holds (none: every row of the file)."""
    if config["stimuli"]["subset"] == "all":
        return []
    return expand(outputs.TRIALS_TSV, subject=SUBJECTS)


def stimuli_storage():
    """Codec and shard settings of the image store (the `stimuli` keys that are storage)."""
    keys = ("codec", "level", "shuffle", "images_per_shard")
    return {key: config["stimuli"][key] for key in keys}


def stim_info_csv(wildcards):
    """`nsd_stim_info_merged.csv` when the release has it (adds coco_id), else nothing."""
    path = layout.stim_info_path(NSD_ROOT)
    return [str(path)] if path.exists() or config["demo"] else []


def affine_source(wildcards):
    """An atlas file of the subject whose affine the session store records (first ROI), if any."""
    first = next(iter(config["rois"]), None)
    return [] if first is None or SURFACE else [roi_mask_path(wildcards.subject, first)]


def estimate_mem_mb(wildcards, input, attempt):
    """Memory of the estimate job itself, from the source's HDF5 header, capped by the ceiling."""
    memory = config["memory"]
    return estimate_job_mem_mb(
        input.betas, memory["factor"], attempt, memory["ceiling_mb"]
    )


def estimate_runtime(wildcards, attempt):
    """Minutes of the estimate job itself x `runtime.factor` x attempt."""
    return estimate_job_runtime_min(config["runtime"]["factor"], attempt)


def job_mem(job):
    """`mem_mb` callable of a heavy rule: its session estimate x attempt, capped by the ceiling.

    `job` is the estimate's job key, formatted with the wildcards (e.g. "roi_session/{roi}").
    """

    def mem_mb(wildcards, input, attempt):
        key = job.format(**wildcards)
        return job_mem_mb(input.estimate, key, attempt, config["memory"]["ceiling_mb"])

    return mem_mb


def job_runtime(job):
    """`runtime` callable (minutes) of a heavy rule: its session estimate x `runtime.factor`
    x attempt."""

    def runtime(wildcards, input, attempt):
        key = job.format(**wildcards)
        return job_runtime_min(
            input.estimate, key, attempt, config["runtime"]["factor"]
        )

    return runtime


def roi_mask_path(subject, roi):
    """The atlas file of an ROI for a subject (surface spaces: its [lh, rh] label files)."""
    file = config["rois"][roi]["file"]
    if SURFACE:
        return [
            str(p)
            for p in layout.surface_label_paths(
                NSD_ROOT, subject, config["space"], file
            )
        ]
    return str(layout.roi_path(NSD_ROOT, subject, config["space"], file))


def roi_mask(wildcards):
    """The atlas file of the job's ROI."""
    return roi_mask_path(wildcards.subject, wildcards.roi)


def roi_labels(wildcards):
    """The label values an ROI keeps, or None for every value >= 1."""
    return config["rois"][wildcards.roi].get("labels")


def roi_parts(wildcards):
    """Per-session part stores of a subject's ROI, in session order."""
    return [
        outputs.ROI_PART.format(
            subject=wildcards.subject, roi=wildcards.roi, session=f"{s:02d}"
        )
        for s in sessions_of(wildcards.subject)
    ]


def subject_rois(wildcards):
    """Every configured ROI of a subject: name -> (atlas file, labels or None)."""
    return {
        name: (roi_mask_path(wildcards.subject, name), roi.get("labels"))
        for name, roi in config["rois"].items()
    }


def subject_roi_masks(wildcards):
    """The distinct atlas files a subject's ROIs use."""
    paths = (path for path, _labels in subject_rois(wildcards).values())
    return sorted(
        {p for path in paths for p in ([path] if isinstance(path, str) else path)}
    )


def heavy_outputs():
    """Outputs of the rules that carry `benchmark:` files (conversion, ROIs, stimuli; `estimate` has one too)."""
    return (
        session_outputs(outputs.SESSION_STORE)
        + expand(
            outputs.ROI_STORE,
            subject=SUBJECTS,
            roi=list(config["rois"]),
        )
        + ([outputs.STIMULI_STORE] if STIMULI else [])
    )


def benchmark_files(wildcards):
    """The benchmark files the heavy jobs wrote (read once they have run)."""
    return sorted(
        str(p)
        for pattern in ("*/*/*.tsv", "stimuli/*.tsv")
        for p in Path("results/benchmarks").glob(pattern)
    )


def subject_session_outputs(pattern):
    """Input function: `pattern` expanded over the configured sessions of the job's subject."""

    def inputs(wildcards):
        return [
            pattern.format(subject=wildcards.subject, session=f"{s:02d}")
            for s in sessions_of(wildcards.subject)
        ]

    return inputs


def subject_roi_stores(wildcards):
    """Every configured ROI store of the job's subject, by ROI name."""
    return {
        roi: outputs.ROI_STORE.format(subject=wildcards.subject, roi=roi)
        for roi in config["rois"]
    }


def qc_outputs():
    """The QC figures and the reliability NIfTIs that `rule all` requests."""
    per_subject = ["store_sizes.png", "trial_counts.png"]
    if config["rois"]:
        per_subject.append("roi_session_drift.png")
    # split-half reliability is mapped onto the subject's NIfTI grid: volume spaces only
    per_roi = (
        []
        if SURFACE
        else ["reliability.nii.gz", "reliability_hist.png", "reliability_slices.png"]
    )
    return expand(
        "results/summary/{subject}_{name}", subject=SUBJECTS, name=per_subject
    ) + expand(
        "results/summary/{subject}_{roi}_{name}",
        subject=SUBJECTS,
        roi=list(config["rois"]),
        name=per_roi,
    )


STIMULI = stimuli_enabled()
