"""Tests for nsdzarr.prepare.trials, on seeded synthetic designs shaped like nsd_expdesign.mat."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.io

from nsdzarr import nsd_facts
from nsdzarr.errors import InputError
from nsdzarr.prepare import trials

N_SESSIONS = 40
N_TRIALS = N_SESSIONS * 750
ALL_SESSIONS = list(range(1, N_SESSIONS + 1))


# --------------------------------------------------------------------------- fixtures


def make_raw_design(seed: int = 0) -> dict[str, np.ndarray]:
    """A random design with the real shapes and 1-based MATLAB conventions."""
    rng = np.random.default_rng(seed)
    # every 10k image shown exactly 3 times, in random order
    order = rng.permutation(np.repeat(np.arange(1, 10_001), 3)).astype(np.float64)
    ids = rng.permutation(73_000) + 1
    shared = ids[:1000]
    own = ids[1000:].reshape(8, 9000)  # disjoint non-shared images per subject
    subjectim = np.hstack([np.tile(shared, (8, 1)), own]).astype(np.float64)
    pattern = np.zeros((40, 12, 75), dtype=np.uint8)
    for s in range(40):
        for r in range(12):
            n = 63 if r % 2 == 0 else 62
            pattern[s, r, np.sort(rng.choice(np.arange(3, 71), n, replace=False))] = 1
    return {
        "masterordering": order.reshape(1, -1),
        "subjectim": subjectim,
        "sharedix": np.sort(shared).reshape(1, -1).astype(np.float64),
        "stimpattern": pattern,
    }


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    return make_raw_design()


@pytest.fixture(scope="module")
def design_path(raw, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("design") / "nsd_expdesign.mat"
    scipy.io.savemat(path, raw)
    return path


@pytest.fixture(scope="module")
def design(design_path) -> trials.Design:
    return trials.load_design(design_path)


@pytest.fixture(scope="module")
def full01(design, design_path) -> trials.Table:
    return trials.trial_table(design, "subj01", ALL_SESSIONS, design_path)


def rep_trials(raw: dict[str, np.ndarray]) -> np.ndarray:
    """(73000, 8, 3) 1-based trial numbers per nsdId/subject/repeat, 0 = not shown (by loop)."""
    out = np.zeros((73_000, 8, 3), dtype=np.int64)
    order = raw["masterordering"][0].astype(int)
    for subj in range(8):
        seen: dict[int, int] = {}
        for t in range(N_TRIALS):
            nsd1 = int(raw["subjectim"][subj, order[t] - 1])
            k = seen.get(nsd1, 0)
            out[nsd1 - 1, subj, k] = t + 1
            seen[nsd1] = k + 1
    return out


def coco_of(nsd_id: int) -> int:
    return 100_000 + 7 * nsd_id


def write_stim_csv(path: Path, raw: dict[str, np.ndarray], drop: set[str] = frozenset()) -> Path:
    """Write a consistent nsd_stim_info_merged.csv (unnamed index column first)."""
    reps = rep_trials(raw)
    shared = set((raw["sharedix"][0].astype(int) - 1).tolist())
    subj_cols = [f"subject{s}" for s in range(1, 9)]
    rep_cols = [f"subject{s}_rep{k}" for s in range(1, 9) for k in range(3)]
    header = ["", "cocoId", "cocoSplit", "cropBox", "nsdId", "shared1000", *subj_cols, *rep_cols]
    keep = [i for i, name in enumerate(header) if name not in drop]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([header[i] for i in keep])
        for nsd in range(73_000):
            row = [
                nsd,
                coco_of(nsd),
                "train2017",
                "(0, 0, 0.1, 0.1)",
                nsd,
                nsd in shared,
                *[int(reps[nsd, s, 0] > 0) for s in range(8)],
                *reps[nsd].reshape(-1).tolist(),
            ]
            writer.writerow([row[i] for i in keep])
    return path


@pytest.fixture(scope="module")
def stim_csv(raw, tmp_path_factory) -> Path:
    return write_stim_csv(tmp_path_factory.mktemp("stim") / "nsd_stim_info_merged.csv", raw)


def row_of(table: trials.Table, trial: int) -> int:
    (idx,) = np.flatnonzero(table["trial"] == trial)
    return int(idx)


# --------------------------------------------------------------------------- load_design


def test_load_design_converts_to_zero_based(raw, design):
    assert np.array_equal(design.masterordering, raw["masterordering"][0].astype(int) - 1)
    assert np.array_equal(design.subjectim, raw["subjectim"].astype(int) - 1)
    assert np.array_equal(design.sharedix, raw["sharedix"][0].astype(int) - 1)
    assert design.stimpattern.dtype == bool and design.stimpattern.shape == (40, 12, 75)
    assert design.n_sessions == 40
    assert design.run_source == trials.RUN_SOURCE_STIMPATTERN


# --------------------------------------------------------------------------- trial_table


def test_columns_and_row_count(design, design_path, full01):
    assert list(full01) == list(trials.TRIAL_COLUMNS)
    assert len(full01["trial"]) == N_TRIALS
    part = trials.trial_table(design, "subj03", [5, 1, 9], design_path)
    assert len(part["trial"]) == 750 * 3
    assert np.all(np.diff(part["trial"]) > 0)  # global trial order even if configured unsorted
    assert sorted(set(part["session"].tolist())) == [1, 5, 9]


def _hand_row(raw, subj: int, t: int) -> dict[str, object]:
    """Expected row for global 0-based trial t, computed with 1-based MATLAB arithmetic."""
    order = raw["masterordering"][0]
    img1 = int(order[t])  # 1-based into the 10k list
    nsd1 = int(raw["subjectim"][subj - 1, img1 - 1])  # 1-based 73k id
    session = t // 750 + 1
    k = t % 750
    seen, run = -1, None
    for r in range(12):
        for slot in range(75):
            if raw["stimpattern"][session - 1, r, slot] == 1:
                seen += 1
                if seen == k:
                    run = r + 1
    repeat = sum(1 for u in range(t) if int(order[u]) == img1)
    return {
        "trial": t,
        "session": session,
        "run": run,
        "trial_in_session": k,
        "image_10k": img1 - 1,
        "nsd_id": nsd1 - 1,
        "shared1000": img1 <= 1000,
        "repeat": repeat,
        "split": "test" if img1 <= 1000 else "train",
    }


def test_hand_computed_rows(raw, design, design_path, full01):
    order = raw["masterordering"][0]
    first_shared = int(np.flatnonzero(order <= 1000)[0])
    third_showing = int(np.flatnonzero(trials.repeat_numbers(order) == 2)[0])
    for subj in (1, 6):
        table = (
            full01
            if subj == 1
            else trials.trial_table(design, f"subj0{subj}", ALL_SESSIONS, design_path)
        )
        for t in (0, 750 * 2 + 5, first_shared, third_showing, N_TRIALS - 1):
            got = {c: table[c][row_of(table, t)].item() for c in trials.TRIAL_COLUMNS}
            assert got == _hand_row(raw, subj, t), t
    assert full01["shared1000"][row_of(full01, first_shared)]
    assert full01["repeat"][row_of(full01, third_showing)] == 2


def test_repeats_are_consistent(full01):
    counts = np.bincount(full01["nsd_id"])
    assert counts.max() <= 3
    for nsd_id in np.unique(full01["nsd_id"])[:500]:
        rows = np.flatnonzero(full01["nsd_id"] == nsd_id)  # already in trial order
        assert full01["repeat"][rows].tolist() == list(range(len(rows)))


def test_repeat_counts_from_session_one(design, design_path, full01):
    part = trials.trial_table(design, "subj01", [3, 2], design_path)
    keep = np.isin(full01["session"], [2, 3])
    for column in trials.TRIAL_COLUMNS:
        assert np.array_equal(part[column], full01[column][keep]), column
    assert part["repeat"].max() > 0  # some images were first shown in session 1


def test_shared1000_identical_across_subjects(design, design_path, full01):
    shared_ids = set(full01["nsd_id"][full01["shared1000"]].tolist())
    assert shared_ids == set(design.sharedix.tolist())
    for subj in range(2, 9):
        other = trials.trial_table(design, f"subj0{subj}", ALL_SESSIONS, design_path)
        mask = full01["shared1000"]
        assert np.array_equal(other["shared1000"], mask)
        assert np.array_equal(other["nsd_id"][mask], full01["nsd_id"][mask])
        assert not set(other["nsd_id"][~mask].tolist()) & set(full01["nsd_id"][~mask].tolist())


def test_split_and_runs(full01):
    assert set(full01["split"][full01["shared1000"]].tolist()) == {"test"}
    assert set(full01["split"][~full01["shared1000"]].tolist()) == {"train"}
    for s in (1, 40):
        runs = full01["run"][full01["session"] == s]
        assert np.all(np.diff(runs) >= 0)
        assert np.bincount(runs)[1:].tolist() == [63, 62] * 6


def test_runs_without_stimpattern_use_documented_lengths(raw, tmp_path):
    path = tmp_path / "nostim.mat"
    scipy.io.savemat(path, {k: v for k, v in raw.items() if k != "stimpattern"})
    design = trials.load_design(path)
    assert design.run_source == trials.RUN_SOURCE_DOCUMENTED
    table = trials.trial_table(design, "subj02", [7], path)
    assert np.bincount(table["run"])[1:].tolist() == list(nsd_facts.DOCUMENTED_RUN_LENGTHS)
    assert table["run"][0] == 1 and table["run"][-1] == 12
    meta = trials.sidecar(table, path, subject="subj02", sessions=[7], run_source=design.run_source)
    assert meta["Rules"]["run_source"] == trials.RUN_SOURCE_DOCUMENTED


# --------------------------------------------------------------------------- coco ids


def test_add_coco_ids_consistent(design, design_path, stim_csv):
    for subj in ("subj01", "subj08"):
        table = trials.trial_table(design, subj, [1, 2, 40], design_path)
        out = trials.add_coco_ids(table, stim_csv, subj)
        assert list(out) == [*trials.TRIAL_COLUMNS, "coco_id"]
        assert np.array_equal(out["coco_id"], [coco_of(n) for n in table["nsd_id"].tolist()])


def test_add_coco_ids_detects_tampering(design, design_path, stim_csv, tmp_path):
    table = trials.trial_table(design, "subj01", [1], design_path)
    nsd_id, trial = int(table["nsd_id"][10]), int(table["trial"][10])
    rep = int(table["repeat"][10])
    tampered = tmp_path / "tampered.csv"
    with stim_csv.open(newline="") as src, tampered.open("w", newline="") as dst:
        rows = list(csv.reader(src))
        col = rows[0].index(f"subject1_rep{rep}")
        assert int(rows[nsd_id + 1][col]) == trial + 1
        rows[nsd_id + 1][col] = str(trial + 2)
        csv.writer(dst).writerows(rows)
    with pytest.raises(InputError) as err:
        trials.add_coco_ids(table, tampered, "subj01")
    msg = str(err.value)
    assert msg.startswith(f"{tampered}: ") and "\n" not in msg
    assert f"nsdId {nsd_id}" in msg and f"trial {trial}" in msg


# --------------------------------------------------------------------------- image table, sidecar


def test_image_table(full01):
    images = trials.image_table(full01)
    assert list(images) == [
        "nsd_id", "image_10k", "shared1000", "split", "n_repeats", "trials", "sessions",
    ]  # fmt: skip
    assert len(images["nsd_id"]) == 10_000
    assert np.all(np.diff(images["nsd_id"]) > 0)
    assert images["n_repeats"].sum() == N_TRIALS
    i = 123
    rows = np.flatnonzero(full01["nsd_id"] == images["nsd_id"][i])
    assert images["trials"][i] == ";".join(str(t) for t in full01["trial"][rows])
    sessions = list(dict.fromkeys(full01["session"][rows].tolist()))
    assert images["sessions"][i] == ";".join(map(str, sessions))
    assert images["image_10k"][i] == full01["image_10k"][rows[0]]
    assert images["split"][i] == ("test" if images["shared1000"][i] else "train")


def test_image_table_counts_configured_sessions_only(design, design_path):
    part = trials.trial_table(design, "subj01", [40], design_path)
    images = trials.image_table(part)
    assert images["n_repeats"].sum() == 750
    assert set(images["sessions"].tolist()) == {"40"}


def test_sidecar(full01, design_path, stim_csv):
    meta = trials.sidecar(
        full01,
        design_path,
        subject="subj01",
        sessions=ALL_SESSIONS,
        run_source=trials.RUN_SOURCE_STIMPATTERN,
        stim_info_csv=stim_csv,
    )
    for column in trials.TRIAL_COLUMNS:
        assert {"LongName", "Description"} <= set(meta[column])
    assert set(meta["shared1000"]["Levels"]) == {"true", "false"}
    assert set(meta["split"]["Levels"]) == {"train", "test"}
    assert meta["Sources"] == {"design": str(design_path), "stim_info": str(stim_csv)}
    assert meta["Rules"]["run_source"] == "stimpattern"
    json.dumps(meta)


# --------------------------------------------------------------------------- writing


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


def test_write_trial_tables(design_path, stim_csv, tmp_path):
    out = tmp_path / "out"
    table = trials.write_trial_tables(
        design_path,
        "subj01",
        [1, 2],
        out / "trials.tsv",
        out / "trials.json",
        out / "images.tsv",
        stim_info_csv=stim_csv,
    )
    assert sorted(p.name for p in out.iterdir()) == ["images.tsv", "trials.json", "trials.tsv"]
    rows = read_tsv(out / "trials.tsv")
    assert rows[0] == [*trials.TRIAL_COLUMNS, "coco_id"]
    assert len(rows) == 1 + 1500
    shared_col = rows[0].index("shared1000")
    assert {r[shared_col] for r in rows[1:]} == {"true", "false"}
    assert rows[1][0] == "0" and rows[1][1] == "1"  # no index column
    first = row_of(table, 0)
    assert rows[1] == [
        str(v).lower() if isinstance(v, bool) else str(v)
        for v in (table[c][first].item() for c in rows[0])
    ]
    meta = json.loads((out / "trials.json").read_text())
    assert set(rows[0]) <= set(meta)
    images = read_tsv(out / "images.tsv")
    assert images[0][-1] == "coco_id"
    assert len(images) == 1 + len(np.unique(table["nsd_id"]))


def test_write_is_all_or_nothing(design_path, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = trials.write_tsv
    calls = []

    def fail_second(table, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(table, path)

    monkeypatch.setattr(trials, "write_tsv", fail_second)
    with pytest.raises(OSError):
        trials.write_trial_tables(
            design_path, "subj01", [1], out / "t.tsv", out / "t.json", out / "i.tsv"
        )
    assert list(out.iterdir()) == []


# --------------------------------------------------------------------------- errors


def _save(tmp_path: Path, raw, **changes) -> Path:
    data = {k: v for k, v in raw.items() if changes.get(k, "keep") is not None}
    data.update({k: v for k, v in changes.items() if v is not None})
    path = tmp_path / "design.mat"
    scipy.io.savemat(path, data)
    return path


def _bad_counts(raw):
    pattern = raw["stimpattern"].copy()
    pattern[4, 0, 0] = 1 - pattern[4, 0, 0]
    return pattern


# each case: (name, build(tmp_path, raw) -> (design, subject, sessions, csv or None), expected)
Case = Callable[[Path, dict], tuple[Path, str, list, Path | None]]


def _design_case(subject="subj01", sessions=(1,), **changes) -> Case:
    return lambda tmp, raw: (_save(tmp, raw, **changes), subject, list(sessions), None)


def _missing_file(tmp, raw):
    return tmp / "nope.mat", "subj01", [1], None


def _not_mat(tmp, raw):
    path = tmp / "design.mat"
    path.write_text("this is not matlab\n")
    return path, "subj01", [1], None


def _binary_csv(tmp, raw):
    path = tmp / "s.csv"
    path.write_bytes(b"\xff\xfe\x00junk")
    return path


def _csv_case(mutate: Callable[[Path, dict], Path]) -> Case:
    def build(tmp, raw):
        return _save(tmp, raw), "subj01", [1], mutate(tmp, raw)

    return build


ERROR_CASES = [
    ("missing design", _missing_file, "file not found"),
    ("not a mat file", _not_mat, "not a readable MATLAB"),
    ("no masterordering", _design_case(masterordering=None), "'masterordering' is missing"),
    ("no subjectim", _design_case(subjectim=None), "'subjectim' is missing"),
    (
        "masterordering 2-D",
        _design_case(masterordering=np.ones((2, 15_000))),
        "masterordering must have shape (1, n)",
    ),
    (
        "masterordering partial session",
        _design_case(masterordering=np.arange(1, 1001).reshape(1, -1)),
        "not a multiple of 750",
    ),
    (
        "masterordering zero",
        _design_case(masterordering=np.zeros((1, 750))),
        "masterordering values must be in 1..10000",
    ),
    (
        "masterordering 4 repeats",
        _design_case(masterordering=np.repeat(np.arange(1, 189), 4)[:750].reshape(1, -1)),
        "at most 3",
    ),
    ("subjectim shape", _design_case(subjectim=np.ones((8, 999))), "subjectim must have shape"),
    (
        "stimpattern shape",
        _design_case(stimpattern=np.ones((40, 12, 70))),
        "stimpattern must have shape",
    ),
    (
        "stimpattern counts",
        lambda tmp, raw: _design_case(stimpattern=_bad_counts(raw))(tmp, raw),
        "stimpattern session 5 has",
    ),
    ("subject subj09", _design_case(subject="subj09"), "subject subj09 is not in the design"),
    (
        "subject beyond subjectim rows",
        lambda tmp, raw: _design_case(
            subject="subj05", subjectim=raw["subjectim"][:4], sharedix=None
        )(tmp, raw),
        "subjectim has 4 subjects",
    ),
    ("subject malformed", _design_case(subject="S1"), "not of the form"),
    ("no sessions", _design_case(sessions=()), "no sessions configured"),
    ("session 0", _design_case(sessions=(0,)), "session 0 is out of range"),
    ("session 41", _design_case(sessions=(40, 41)), "session 41 is out of range"),
    (
        "session beyond short masterordering",
        lambda tmp, raw: _design_case(
            sessions=(1, 3), masterordering=raw["masterordering"][:, :1500]
        )(tmp, raw),
        "covers sessions 1..2",
    ),
    ("duplicate session", _design_case(sessions=(2, 2)), "twice"),
    ("missing csv", _csv_case(lambda tmp, raw: tmp / "none.csv"), "file not found"),
    (
        "csv without rep column",
        _csv_case(lambda tmp, raw: write_stim_csv(tmp / "s.csv", raw, drop={"subject1_rep2"})),
        "missing column(s) subject1_rep2",
    ),
    ("csv not text", _csv_case(_binary_csv), "not a readable CSV"),
]


@pytest.mark.parametrize(
    ("name", "build", "expected"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_errors_are_one_line_and_leave_nothing(raw, tmp_path, name, build, expected):
    design_path, subject, sessions, stim = build(tmp_path, raw)
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        trials.write_trial_tables(
            design_path,
            subject,
            sessions,
            out / "trials.tsv",
            out / "trials.json",
            out / "images.tsv",
            stim_info_csv=stim,
        )
    msg = str(err.value)
    blamed = stim if stim is not None and "csv" in name else design_path
    assert msg.startswith(f"{blamed}: "), msg
    assert "\n" not in msg
    assert expected in msg, msg
    assert not out.exists() or list(out.iterdir()) == []


def test_csv_missing_nsd_id(design, design_path, raw, tmp_path):
    table = trials.trial_table(design, "subj01", [1], design_path)
    path = write_stim_csv(tmp_path / "s.csv", raw)
    lines = path.read_text().splitlines()
    gone = int(table["nsd_id"][0])
    path.write_text("\n".join(line for i, line in enumerate(lines) if i != gone + 1) + "\n")
    with pytest.raises(InputError, match=f"nsdId {gone} .* is not listed"):
        trials.add_coco_ids(table, path, "subj01")
