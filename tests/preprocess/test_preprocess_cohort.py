"""`hpcgan preprocess` on a realistic cohort made once from the sample brains (seven geometries,
two modalities, two bad subjects): the same bytes for 1, 2 and 3 ranks and for 1 or 2 BLAS threads,
pseudonyms on every path (manifest, resume records, every rank's log, with and without --debug),
and a rank killed mid-shard."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from conftest import hpcgan_cmd, mpi_env, mpirun_cmd, requires_mpirun, run_hpcgan, run_hpcgan_mpi

from hpcgan.preprocess.plan import pseudonym
from hpcgan.preprocess.shards import SHARD_PATTERN

pytestmark = [requires_mpirun, pytest.mark.mpi, pytest.mark.slow]  # about 80 s in all on 2 cores

# With this salt the truncated subject shares train-00001 with PatientClarke, which rank 1 writes
# on 2 and on 3 ranks: its skip is found and logged by a rank other than the planning one.
SALT = "salt-of-the-cohort-test-0000"
GOOD = (
    "PatientSmith",
    "PatientJones",
    "PatientBrown",
    "PatientTaylor",
    "PatientWilson",
    "PatientDavies",
    "PatientClarke",
)
TRUNCATED = "PatientEvans"  # its t1 data is cut short: found by the rank writing its shard
NOT_NIFTI = "PatientHughes"  # its t1 is a text file: found by rank 0 while planning
COMMON = (
    "--modalities",
    "t1,t2",
    "--size",
    "64",
    "--slices",
    "20:26",
    "--min-brain-fraction",
    "0",
    "--shards",
    "5",
    "--skip-bad",
)
PSEUDONYMIZED = COMMON + ("--dtype", "uint8", "--compression", "gzip", "--pseudonymize")


def threads(n: int) -> dict:
    return {"OMP_NUM_THREADS": str(n), "OPENBLAS_NUM_THREADS": str(n)}


def translation(x, y, z):
    shift = np.eye(4)
    shift[:3, 3] = [x, y, z]
    return shift


def save(path: Path, data, affine, dtype=None, slope=None):
    image = nib.Nifti1Image(np.asarray(data if dtype is None else data.astype(dtype)), affine)
    if slope is not None:
        image.header.set_slope_inter(slope, 0.0)
    nib.save(image, path)


@pytest.fixture(scope="module")
def cohort(sample_data, tmp_path_factory) -> Path:
    """<root>/input/<Patient…>/<Patient…>_{t1,t2}.nii[.gz] and <root>/salt. t2 is a second real
    contrast on the same grid (MNI152's grey-matter map, Colin27 with skull)."""
    from scipy import ndimage

    root = tmp_path_factory.mktemp("cohort")
    (root / "salt").write_text(SALT + "\n")
    inp = root / "input"

    def load(subject, modality):
        image = nib.load(sample_data / subject / f"{subject}_{modality}.nii.gz")
        return np.asanyarray(image.dataobj), image.affine

    (mni_t1, mni), (mni_t2, _) = load("mni152", "t1"), load("mni152", "gm")
    if (sample_data / "colin27").exists():
        (colin_t1, colin), (colin_t2, _) = load("colin27", "t1"), load("colin27", "t1head")
    else:
        (colin_t1, colin), colin_t2 = (mni_t1[::-1].copy(), mni), mni_t2[::-1].copy()

    def subject(name, affine, t1, t2, suffix=".nii.gz", **kwargs):
        (inp / name).mkdir(parents=True)
        for modality, data in (("t1", t1), ("t2", t2)):
            save(inp / name / f"{name}_{modality}{suffix}", data, affine, **kwargs)

    subject("PatientSmith", mni, mni_t1, mni_t2)  # 1 mm, uint8, as shipped
    subject("PatientJones", colin, colin_t1, colin_t2)
    # Resampled to 1.6 mm, int16 with a scale slope.
    zoomed = [ndimage.zoom(v.astype(np.float32), 1 / 1.6, order=1) * 4 for v in (mni_t1, mni_t2)]
    subject("PatientBrown", mni @ np.diag([1.6, 1.6, 1.6, 1]), *np.round(zoomed), dtype=np.int16, slope=0.25)
    # 3 mm slices, float64 on disk, stored LPS (x and y flipped).
    flip = np.diag([-1.0, -1.0, 3.0, 1.0])
    flip[:2, 3] = [colin_t1.shape[0] - 1, colin_t1.shape[1] - 1]
    subject("PatientTaylor", colin @ flip, colin_t1[::-1, ::-1, ::3], colin_t2[::-1, ::-1, ::3], dtype=np.float64)
    # Padded to a non-square 237 x 258 mm slice, float32.
    pad = ((30, 10), (0, 25), (0, 0))
    subject("PatientWilson", mni @ translation(-30, 0, 0), np.pad(mni_t1, pad), np.pad(mni_t2, pad), dtype=np.float32)
    # Large and anisotropic: 0.5 x 0.5 x 2 mm, 394 x 466 pixels a slice, float64 .nii (memory-mapped);
    # 40 slices of the mid-brain (its slices 20:26 are MNI152's 80:92).
    big = [ndimage.zoom(v[:, :, 40:120:2].astype(np.float64), (2, 2, 1), order=1) * 1.37 for v in (mni_t1, mni_t2)]
    subject("PatientDavies", mni @ np.diag([0.5, 0.5, 2.0, 1.0]) @ translation(0, 0, 20), *big, suffix=".nii")
    # Cropped to 150 x 180 voxels a slice, int16.
    subject(
        "PatientClarke",
        colin @ translation(15, 20, 0),
        colin_t1[15:165, 20:200],
        colin_t2[15:165, 20:200],
        dtype=np.int16,
    )
    subject(TRUNCATED, mni, mni_t1, mni_t2)
    victim = inp / TRUNCATED / f"{TRUNCATED}_t1.nii.gz"
    victim.write_bytes(victim.read_bytes()[:200_000])
    subject(NOT_NIFTI, mni, mni_t1, mni_t2)
    (inp / NOT_NIFTI / f"{NOT_NIFTI}_t1.nii.gz").write_text(f"{NOT_NIFTI}: not an image\n" * 50)
    return root


def run_preprocess(ranks: int, cohort: Path, out: Path, *args, env: dict):
    args = ("preprocess", "--input", cohort / "input", "--output", out, *args)
    if ranks == 1:
        return run_hpcgan(*args, env=mpi_env(env), check=True, timeout=300)
    return run_hpcgan_mpi(ranks, *args, env=env, check=True, timeout=300)


def tree(out: Path) -> dict:
    """Every file under a dataset directory (records and hidden files included) → its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def assert_same_dataset(a: Path, b: Path, what: str):
    files_a, files_b = tree(a), tree(b)
    assert sorted(files_a) == sorted(files_b), what
    for name in files_a:
        assert files_a[name] == files_b[name], f"{what}: {name} differs"


@pytest.fixture(scope="module")
def pseudonymized_runs(cohort, tmp_path_factory) -> dict:
    """{ranks: (dataset, stderr)} of `--pseudonymize --skip-bad`, uint8 + gzip, on 1, 2 (with
    --debug: every rank logs) and 3 ranks, with 1, 2 and 1 BLAS threads."""
    runs = {}
    for ranks, n_threads, extra in ((1, 1, ()), (2, 2, ("--debug",)), (3, 1, ())):
        out = tmp_path_factory.mktemp(f"pseudonymized-{ranks}") / "ds"
        result = run_preprocess(
            ranks, cohort, out, *PSEUDONYMIZED, "--salt-file", cohort / "salt", *extra, env=threads(n_threads)
        )
        runs[ranks] = (out, result.stdout + result.stderr)
    return runs


def test_pseudonymized_outputs_and_every_ranks_log_never_name_an_input(cohort, pseudonymized_runs, tmp_path):
    ids = {name: pseudonym(name, SALT) for name in GOOD + (TRUNCATED, NOT_NIFTI)}
    # Without --skip-bad the first bad subject stops the run: its one-line error uses the pseudonym too.
    args = [a for a in PSEUDONYMIZED if a != "--skip-bad"]
    result = run_hpcgan(
        "preprocess", "--input", cohort / "input", "--output", tmp_path / "ds", *args, "--salt-file", cohort / "salt"
    )
    assert result.returncode == 2 and "Patient" not in result.stderr + result.stdout, result.stderr
    assert f"error: subject {ids[NOT_NIFTI]}: t1 volume: not a readable NIfTI file" in result.stderr
    for ranks, (out, log) in pseudonymized_runs.items():
        manifest = json.loads((out / "manifest.json").read_text())
        assert sorted(manifest["subjects"]) == sorted(ids[name] for name in GOOD), ranks
        skipped = {s["subject"]: s["reason"] for s in manifest["skipped"]}
        assert skipped.keys() == {ids[TRUNCATED], ids[NOT_NIFTI]}, ranks
        assert skipped[ids[TRUNCATED]].startswith("t1 volume: truncated or corrupt data"), skipped
        assert skipped[ids[NOT_NIFTI]].startswith("t1 volume: not a readable NIfTI file"), skipped
        # The subject skipped while writing is in its shard's resume record, under its pseudonym.
        records = [json.loads(p.read_text()) for p in (out / ".parts").glob("*.h5.json")]
        assert [s["subject"] for r in records for s in r["skipped"]] == [ids[TRUNCATED]]
        warnings = [line for line in log.splitlines() if "WARNING skipping subject" in line]
        assert len(warnings) == 2 and f"{ids[TRUNCATED]}: t1 volume: truncated" in "".join(warnings), log
        if ranks > 1:
            assert f"[rank 1/{ranks}] WARNING skipping subject {ids[TRUNCATED]}" in log, log
        for path in out.rglob("*"):
            if path.suffix == ".h5":
                with h5py.File(path, "r") as f:
                    assert all(s.decode().startswith("sub-") for s in f["subject"][()]), path
        blobs = {"log": log.encode(), **tree(out)}
        for secret in (b"Patient", str(cohort).encode()):
            leaks = [name for name, blob in blobs.items() if secret in blob]
            assert not leaks, (ranks, secret, leaks)


def test_any_number_of_ranks_writes_the_same_bytes(pseudonymized_runs):
    (one, _), (two, _), (three, _) = (pseudonymized_runs[r] for r in (1, 2, 3))
    manifest = json.loads((one / "manifest.json").read_text())
    assert manifest["dtype"] == "uint8" and manifest["image_shape"] == [2, 64, 64]
    assert [s["name"] for s in manifest["shards"]] == [f"train-{j:05d}-of-00005.h5" for j in range(5)] + [
        "val-00000-of-00001.h5"
    ]
    assert all(s["slices"] == 6 for s in manifest["subjects"].values())  # every geometry gave its slices
    with h5py.File(one / "train-00000-of-00005.h5", "r") as f:
        assert f["images"].compression == "gzip" and f["images"].dtype == np.uint8
    assert_same_dataset(one, two, "1 vs 2 ranks")
    assert_same_dataset(one, three, "1 vs 3 ranks")


def test_bytes_do_not_depend_on_ranks_or_blas_threads(cohort, tmp_path):
    """float16 shows a one-ulp change that uint8 rounds away: before the resize summed its taps
    itself, 1 and 2 BLAS threads gave different float16 pixels on the large anisotropic subject."""
    outs = {}
    for ranks, n_threads in ((1, 2), (2, 1), (3, 2)):
        outs[ranks] = tmp_path / f"ranks-{ranks}"
        run_preprocess(ranks, cohort, outs[ranks], *COMMON, env=threads(n_threads))
    manifest = json.loads((outs[1] / "manifest.json").read_text())
    assert manifest["dtype"] == "float16" and manifest["subjects"]["PatientDavies"]["slices"] == 6
    assert {s["subject"] for s in manifest["skipped"]} == {TRUNCATED, NOT_NIFTI}
    assert str(cohort) not in json.dumps(manifest)  # base names only, never an input path
    assert_same_dataset(outs[1], outs[2], "1 rank, 2 threads vs 2 ranks, 1 thread")
    assert_same_dataset(outs[1], outs[3], "1 rank, 2 threads vs 3 ranks, 2 threads")


def rank_pids(launcher: int) -> list:
    """Processes started by the mpirun with pid `launcher` (its ranks)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # not a process, or one that just ended
        if int(fields[1]) == launcher:
            pids.append(int(entry))
    return pids


def writer_of(pids: list, prefix: str):
    """The pid among `pids` that has a file whose path starts with `prefix` open, else None."""
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(prefix):
                    return pid
            except OSError:
                continue
    return None


def test_a_rank_killed_mid_shard_ends_the_job_and_a_rerun_completes_it(cohort, pseudonymized_runs, tmp_path):
    reference = pseudonymized_runs[1][0]
    manifest = json.loads((reference / "manifest.json").read_text())
    shard = manifest["subjects"][pseudonym("PatientDavies", SALT)]["shard"]  # the slowest subject's shard
    out = tmp_path / "ds"
    args = ("preprocess", "--input", cohort / "input", "--output", out, *PSEUDONYMIZED, "--salt-file", cohort / "salt")
    job = subprocess.Popen(
        mpirun_cmd(2) + hpcgan_cmd(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=mpi_env(),
        start_new_session=True,
    )
    try:
        deadline, victim, ranks = time.monotonic() + 120, None, []
        while victim is None and job.poll() is None and time.monotonic() < deadline:
            ranks = ranks if len(ranks) == 2 else rank_pids(job.pid)
            victim = writer_of(ranks, f"{out}/.{shard}.")  # the temporary file of that shard is open
            time.sleep(0.002)
        assert victim is not None, f"never saw a rank writing {shard}: {job.poll()}"
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        log, _ = job.communicate(timeout=60)
        ended_after = time.monotonic() - killed
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.communicate()
    assert job.returncode != 0 and ended_after < 30, (job.returncode, ended_after, log[-2000:])
    assert not (out / "manifest.json").exists()
    # What the kill left: the shard's temporary file (hidden, never read) and only complete shards.
    assert [p.name for p in out.glob(f".{shard}.*")], sorted(p.name for p in out.iterdir())
    finished = [path.name for path in out.iterdir() if SHARD_PATTERN.match(path.name)]
    assert finished  # rank 0 writes the slow subject's shard after its others
    for name in finished:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    # The same command on 3 ranks completes it: the same bytes as an uninterrupted run, no leftovers.
    rerun = run_hpcgan_mpi(3, *args, check=True, timeout=300)
    assert f"kept {len(finished)} shard(s) finished by an earlier run" in rerun.stderr, rerun.stderr
    assert_same_dataset(reference, out, "uninterrupted vs killed and re-run")
