"""A seeded miniature NSD release, encoded exactly as the real one, for the demo and tests."""

from __future__ import annotations

import gzip
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import scipy.io

from nsdzarr.nsd_facts import (
    BETA_SCALE,
    DOCUMENTED_RUN_LENGTHS,
    MAX_SUBJECTS,
    N_IMAGES_10K,
    N_IMAGES_73K,
    N_SHARED,
    RUNS_PER_SESSION,
    SLOTS_PER_RUN,
    TRIALS_PER_SESSION,
)
from nsdzarr.prepare import layout
from nsdzarr.prepare.atomic import atomic_output
from nsdzarr.prepare.demo_spec import ROI_FILES, SURFACE_ROI_FILES, DemoSpec, demo_files
from nsdzarr.prepare.provenance import demo_marker, require_demo_target

SESSIONS_IN_DESIGN = 40  # the demo design covers as many sessions as the longest subject
VOXEL_MM = 1.8
# Shortest lag between two showings of an image, as a fraction of the experiment left.
MIN_LAG = 1e-3
VISUAL_ROI_LABELS = ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4")


def run_lengths() -> list[int]:
    """Stimulus trials per run in an NSD session: 63 in odd runs, 62 in even ones (sum 750)."""
    return list(DOCUMENTED_RUN_LENGTHS)


def affine(shape_xyz: tuple[int, int, int]) -> np.ndarray:
    """A 1.8 mm RAS affine centred on the volume, like the NSD functional space."""
    aff = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    aff[:3, 3] = -VOXEL_MM * (np.asarray(shape_xyz) - 1) / 2
    return aff


def brain_mask(shape_xyz: tuple[int, int, int]) -> np.ndarray:
    """Boolean ellipsoid brain in NIfTI (X, Y, Z) order."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_xyz], indexing="ij")
    return sum(g**2 for g in grids) <= 0.85


def roi_volumes(shape_xyz: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """int16 ROI atlases in (X, Y, Z): -1 outside brain, 0 unlabeled, labels >= 1."""
    brain = brain_mask(shape_xyz)
    x, y, z = np.meshgrid(*[np.linspace(0, 1, n) for n in shape_xyz], indexing="ij")
    posterior = brain & (y < 0.45)
    general = np.where(brain, 0, -1).astype(np.int16)
    general[posterior & (z > 0.2)] = 1
    visual = np.where(brain, 0, -1).astype(np.int16)
    # seven bands of about equal size along y inside the occipital part
    occipital = posterior & (z > 0.3) & (x > 0.15) & (x < 0.85)
    edges = np.quantile(y[occipital], np.linspace(0, 1, len(VISUAL_ROI_LABELS) + 1)[1:-1])
    visual[occipital] = np.digitize(y[occipital], edges) + 1
    return dict(zip(ROI_FILES, (general, visual), strict=True))


def showing_order(rng: np.random.Generator, showings: int = 3) -> np.ndarray:
    """1-based 10k image per trial: every image shown ``showings`` times, at lags from a few
    trials to months, as in NSD (so a few sessions already repeat hundreds of images)."""
    # Times in (0, 1): the first showing uniform, each next one a log-uniform fraction
    # (MIN_LAG..1) of the time left; the trials are the times in order.
    times = [rng.uniform(0, 1, N_IMAGES_10K)]
    for _ in range(showings - 1):
        lag = np.exp(rng.uniform(np.log(MIN_LAG), 0, N_IMAGES_10K))
        times.append(times[-1] + lag * (1 - times[-1]))
    order = np.argsort(np.concatenate(times), kind="stable")
    return order % N_IMAGES_10K + 1


def make_design(seed: int) -> dict[str, np.ndarray]:
    """An ``nsd_expdesign.mat``-like design: 1-based ids, shared1000 first in each row."""
    rng = np.random.default_rng(seed)
    pool = rng.permutation(N_IMAGES_73K) + 1  # 1-based 73k ids
    sharedix = np.sort(pool[:N_SHARED])
    subjectim = np.empty((MAX_SUBJECTS, N_IMAGES_10K), dtype=np.float64)
    per_subject = N_IMAGES_10K - N_SHARED
    for s in range(MAX_SUBJECTS):
        own = pool[N_SHARED + s * per_subject : N_SHARED + (s + 1) * per_subject]
        subjectim[s] = np.concatenate([sharedix, own])
    masterordering = showing_order(rng)[None, :].astype(np.float64)
    stimpattern = np.zeros((SESSIONS_IN_DESIGN, RUNS_PER_SESSION, SLOTS_PER_RUN), dtype=np.float64)
    for run, n in enumerate(run_lengths()):
        slots = np.linspace(3, SLOTS_PER_RUN - 4, n).round().astype(int)
        stimpattern[:, run, slots] = 1
    return {
        "masterordering": masterordering,
        "subjectim": subjectim,
        "sharedix": sharedix.astype(np.float64)[None, :],
        "stimpattern": stimpattern,
    }


def stim_info_rows(design: dict[str, np.ndarray], seed: int) -> tuple[list[str], np.ndarray]:
    """``nsd_stim_info_merged.csv`` columns and integer rows for the 73k images of a design."""
    rng = np.random.default_rng([seed, 73])
    coco_id = rng.choice(600_000, size=N_IMAGES_73K, replace=False)
    shared = np.zeros(N_IMAGES_73K, dtype=np.int64)
    shared[design["sharedix"][0].astype(int) - 1] = 1
    image_10k = design["masterordering"][0].astype(int) - 1
    columns = ["cocoId", "nsdId", "shared1000"]
    values = [coco_id, np.arange(N_IMAGES_73K), shared]
    seen, reps = [], []
    for s in range(MAX_SUBJECTS):
        ids = design["subjectim"][s].astype(int) - 1
        member = np.zeros(N_IMAGES_73K, dtype=np.int64)
        member[ids] = 1
        seen.append(member)
        rep = np.zeros((N_IMAGES_73K, 3), dtype=np.int64)
        count = np.zeros(N_IMAGES_73K, dtype=np.int64)
        for trial, nsd in enumerate(ids[image_10k]):
            rep[nsd, count[nsd]] = trial + 1  # 1-based global trial
            count[nsd] += 1
        reps.append(rep)
    columns += [f"subject{s + 1}" for s in range(MAX_SUBJECTS)]
    values += seen
    for s in range(MAX_SUBJECTS):
        columns += [f"subject{s + 1}_rep{k}" for k in range(3)]
        values += list(reps[s].T)
    return columns, np.stack(values, axis=1)


def write_stim_info(path: Path, design: dict[str, np.ndarray], seed: int) -> None:
    """Write an ``nsd_stim_info_merged.csv`` consistent with the design (unnamed index first)."""
    columns, rows = stim_info_rows(design, seed)
    split = np.where(rows[:, 0] % 5 == 0, "val2017", "train2017")
    with atomic_output(path) as tmp, open(tmp, "w") as fh:
        fh.write(",cocoId,cocoSplit,cropBox," + ",".join(columns[1:]) + "\n")
        for i, row in enumerate(rows):
            rest = ",".join(map(str, row[1:]))
            fh.write(f'{i},{row[0]},{split[i]},"(0, 0, 0.125, 0.125)",{rest}\n')


def session_betas(
    design: dict[str, np.ndarray], subject: str, session: int, spec: DemoSpec
) -> np.ndarray:
    """int16 betas in h5py order ``(750, Z, Y, X)``: image signal + noise + a session offset."""
    subj = int(subject.removeprefix("subj"))
    rng = np.random.default_rng([spec.seed, subj, session])
    brain_zyx = brain_mask(spec.shape_xyz).T
    n_vox = int(brain_zyx.sum())
    trials = np.arange((session - 1) * TRIALS_PER_SESSION, session * TRIALS_PER_SESSION)
    image_10k = design["masterordering"][0, trials].astype(int) - 1
    nsd_id = design["subjectim"][subj - 1, image_10k].astype(int) - 1
    # a repeatable response per image: 4 latent factors drawn from the image id, fixed voxel weights
    factors = np.stack([np.random.default_rng([spec.seed, i]).standard_normal(4) for i in nsd_id])
    weights = np.random.default_rng([spec.seed, subj]).standard_normal((4, n_vox))
    psc = factors @ weights + rng.standard_normal((TRIALS_PER_SESSION, n_vox)) * 1.5
    psc += rng.normal(0, 0.5)  # per-session offset
    betas = np.zeros((TRIALS_PER_SESSION, *brain_zyx.shape), dtype=np.int16)
    betas[:, brain_zyx] = np.clip(np.round(psc * BETA_SCALE), -32768, 32767).astype(np.int16)
    return betas


def write_betas_hdf5(path: Path, betas: np.ndarray) -> None:
    """Write ``/betas`` as NSD does: uncompressed, one chunk per voxel ``(T, 1, 1, 1)``."""
    with atomic_output(path) as tmp, h5py.File(tmp, "w", track_order=False) as f:
        f.create_dataset("betas", data=betas, chunks=(betas.shape[0], 1, 1, 1), track_times=False)


def write_nifti_gz(path: Path, data: np.ndarray, aff: np.ndarray) -> None:
    """Write a NIfTI-1 ``.nii.gz`` with a fixed gzip mtime so reruns are byte-identical."""
    img = nib.Nifti1Image(data, aff)
    img.header.set_xyzt_units("mm")
    with (
        atomic_output(path) as tmp,
        open(tmp, "wb") as fh,
        gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz,
    ):
        gz.write(img.to_bytes())


def write_demo(root: str | Path, spec: DemoSpec | None = None) -> list[Path]:
    """Generate the miniature NSD release under ``root``; deterministic for a given spec."""
    spec = spec or DemoSpec()
    require_demo_target(root)
    Path(root).mkdir(parents=True, exist_ok=True)
    demo_marker(root).write_text("generated by nsd-zarr (nsdzarr.prepare.demo.write_demo)\n")
    design = make_design(spec.seed)
    design_file = layout.design_path(root)
    design_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(design_file) as tmp:
        scipy.io.savemat(tmp, design, format="5", do_compression=False)
    write_stim_info(layout.stim_info_path(root), design, spec.seed)
    write_demo_stimuli(layout.stimuli_path(root), spec.seed)
    aff = affine(spec.shape_xyz)
    for subject in spec.subjects:
        for session in range(1, spec.sessions + 1):
            path = layout.betas_path(root, subject, spec.space, spec.beta_version, session)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_betas_hdf5(path, session_betas(design, subject, session, spec))
        if layout.is_surface(spec.space):
            write_surface_subject(root, design, subject, spec)
            continue
        for name, vol in roi_volumes(spec.shape_xyz).items():
            path = layout.roi_path(root, subject, spec.space, name)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_nifti_gz(path, vol, aff)
    return demo_files(root, spec)


# Vertices per hemisphere of the demo's surfaces: fsaverage's icosahedron of order 2 (the real
# one is order 7, 163842), and a small native pair whose hemispheres differ like the real ones.
DEMO_VERTICES = {"fsaverage": (162, 162), "nativesurface": (190, 185)}


def surface_labels(n_vertices: int, hemi: int) -> dict[str, np.ndarray]:
    """Demo vertex labels: nsdgeneral (-1 / 0 / 1) and prf-visualrois (0..7), as MGZ does."""
    pos = np.linspace(0, 1, n_vertices)
    general = np.where(pos < 0.1, -1, (pos > 0.45 + 0.05 * hemi).astype(int))
    visual = np.where(pos > 0.7, 1 + ((pos - 0.7) / 0.3 * len(VISUAL_ROI_LABELS)).astype(int), 0)
    visual = np.minimum(visual, len(VISUAL_ROI_LABELS))
    return dict(zip(SURFACE_ROI_FILES, (general, visual), strict=True))


def surface_betas(
    design: dict[str, np.ndarray], subject: str, session: int, n_vertices: int, hemi: int, seed: int
) -> np.ndarray:
    """PSC betas ``(750, vertices)`` float32: image signal + noise + a session offset."""
    subj = int(subject.removeprefix("subj"))
    rng = np.random.default_rng([seed, subj, session, 100 + hemi])
    trials = np.arange((session - 1) * TRIALS_PER_SESSION, session * TRIALS_PER_SESSION)
    nsd_id = design["subjectim"][subj - 1, design["masterordering"][0, trials].astype(int) - 1]
    factors = np.stack([np.random.default_rng([seed, int(i)]).standard_normal(4) for i in nsd_id])
    weights = np.random.default_rng([seed, subj, 100 + hemi]).standard_normal((4, n_vertices))
    psc = factors @ weights + rng.standard_normal((TRIALS_PER_SESSION, n_vertices)) * 1.5
    return (psc + rng.normal(0, 0.5)).astype(np.float32)


def write_mgh(path: Path, data: np.ndarray) -> None:
    """An MGH (``.mgh``) or gzipped MGZ (``.mgz``, fixed gzip mtime) of ``data`` as given."""
    raw = nib.MGHImage(data, np.eye(4)).to_bytes()
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        if path.suffix == ".mgz":
            with gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, filename="") as gz:
                gz.write(raw)
        else:
            fh.write(raw)


def write_surface_session(path: Path, betas: np.ndarray) -> None:
    """One hemisphere as NSD writes it: MGH ``(V, 1, 1, 750)`` float32, or HDF5 ``betas``
    ``(750, V)`` int16 x 300 with one chunk per vertex."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".mgh":
        write_mgh(path, betas.T[:, None, None, :])
        return
    scaled = np.clip(np.round(betas * BETA_SCALE), -32768, 32767).astype(np.int16)
    with atomic_output(path) as tmp, h5py.File(tmp, "w", track_order=False) as f:
        f.create_dataset("betas", data=scaled, chunks=(len(scaled), 1), track_times=False)


def write_surface_subject(
    root: str | Path, design: dict[str, np.ndarray], subject: str, spec: DemoSpec
) -> None:
    """A subject's surface betas for every session, and the surface labels."""
    counts = DEMO_VERTICES[spec.space]
    for session in range(1, spec.sessions + 1):
        paths = layout.surface_betas_paths(root, subject, spec.space, spec.beta_version, session)
        for h, (path, n) in enumerate(zip(paths, counts, strict=True)):
            write_surface_session(path, surface_betas(design, subject, session, n, h, spec.seed))
    for name in SURFACE_ROI_FILES:
        paths = layout.surface_label_paths(root, subject, spec.space, name)
        for h, (path, n) in enumerate(zip(paths, counts, strict=True)):
            path.parent.mkdir(parents=True, exist_ok=True)
            write_mgh(path, surface_labels(n, h)[name].astype(np.int32)[:, None, None])


def write_synthetic_session(
    path: str | Path,
    shape_zyx: tuple[int, int, int] = (83, 104, 81),
    n_trials: int = TRIALS_PER_SESSION,
    seed: int = 0,
    brain_fraction: float = 0.38,
) -> Path:
    """A real-size NSD-layout session for benchmarks: noise x 300 inside an ellipsoid brain.

    Written z-slab by z-slab, so memory stays near one slab even for a 1 mm volume.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape_zyx], indexing="ij")
    radius2 = (brain_fraction / (4 / 3 * np.pi / 8)) ** (2 / 3)
    brain = sum(g**2 for g in grids) <= radius2
    rng = np.random.default_rng(seed)
    with atomic_output(path) as tmp, h5py.File(tmp, "w") as f:
        d = f.create_dataset(
            "betas",
            shape=(n_trials, *shape_zyx),
            dtype=np.int16,
            chunks=(n_trials, 1, 1, 1),
            track_times=False,
        )
        for z in range(shape_zyx[0]):
            plane = np.zeros((n_trials, *shape_zyx[1:]), dtype=np.int16)
            n = int(brain[z].sum())
            noise = rng.standard_normal((n_trials, n)) * BETA_SCALE
            plane[:, brain[z]] = np.round(noise).astype(np.int16)
            d[:, z] = plane
    return path


# Rows per HDF5 chunk of the demo brick: a plausible layout for the real, undocumented one.
DEMO_STIMULI_CHUNK_ROWS = 100
_DEMO_STIMULI_BLOCK = 1000  # rows drawn from one seeded generator


def demo_stimuli_block(block: int, seed: int = 0, shape_hw: tuple[int, int] = (8, 6)) -> np.ndarray:
    """Demo images ``block * 1000 ..`` + 1000: seeded noise whose pixels ``[0, 0]`` and ``[0, 1]``
    spell the nsd_id (base 256, big- and little-endian) and ``[H-1, W-1]`` is ``(H, W, 255)``."""
    h, w = shape_hw
    out = np.random.default_rng((seed, block)).integers(
        0, 256, (_DEMO_STIMULI_BLOCK, h, w, 3), dtype=np.uint8
    )
    ids = np.arange(block * _DEMO_STIMULI_BLOCK, (block + 1) * _DEMO_STIMULI_BLOCK)
    digits = np.stack([(ids >> 16) & 255, (ids >> 8) & 255, ids & 255], axis=1).astype(np.uint8)
    out[:, 0, 0, :] = digits
    out[:, 0, 1, :] = digits[:, ::-1]  # reversed, so a flipped channel axis is caught too
    out[:, h - 1, w - 1, :] = (h, w, 255)
    return out


def demo_stimulus_id(image: np.ndarray) -> int:
    """The nsd_id a demo image (``(H, W, 3)``, as written) spells in its pixel ``[0, 0]``."""
    r, g, b = (int(v) for v in image[0, 0])
    return (r << 16) | (g << 8) | b


def write_demo_stimuli(
    path: str | Path, seed: int = 0, n: int = N_IMAGES_73K, shape_hw: tuple[int, int] = (8, 6)
) -> Path:
    """The stimulus brick ``imgBrick`` ``(n, H, W, 3)`` uint8, chunked by 100 rows, atomically.

    Row ``i`` is the same whatever ``n``, so a short brick is a prefix of the full one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = shape_hw
    with atomic_output(path) as tmp, h5py.File(tmp, "w", track_order=False) as f:
        dset = f.create_dataset(
            "imgBrick",
            shape=(n, h, w, 3),
            dtype=np.uint8,
            chunks=(max(1, min(DEMO_STIMULI_CHUNK_ROWS, n)), h, w, 3),
            track_times=False,
        )
        for block, start in enumerate(range(0, n, _DEMO_STIMULI_BLOCK)):
            stop = min(start + _DEMO_STIMULI_BLOCK, n)
            dset[start:stop] = demo_stimuli_block(block, seed, shape_hw)[: stop - start]
    return path
