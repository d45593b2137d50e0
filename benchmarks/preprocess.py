"""Benchmark of `hpcgan preprocess` and of reading its output (issue 3).

The real sample volumes (MNI152 and Colin27 T1, with their seg masks) are repeated under new
subject names (symlinks in a temp dir) to make a cohort large enough to time. One table:

  - slices/s of `hpcgan preprocess` on 1 rank, and its wall time over the wall time of a process
    that only loads the same volumes with nibabel's get_fdata (goal <= 1.5);
  - speed-up of 2 ranks (mpirun -np 2) over 1 rank (goal >= 1.7);
  - peak RSS of a rank over the largest decoded volume (get_fdata, float64) (goal <= 3);
  - training reads: SliceDataset images/s over plain h5py reads of the same rows.

Run: .venv/bin/python benchmarks/preprocess.py [--quick] [--subjects N] [--size 256]
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update({"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                "OMPI_MCA_btl_vader_single_copy_mechanism": "none", "OMPI_MCA_rmaps_base_oversubscribe": "1",
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return env


def timed(cmd) -> tuple:
    """(wall seconds, peak RSS in bytes of the largest process it started), in a fresh wrapper
    so getrusage(RUSAGE_CHILDREN) sees only this command's processes."""
    wrapper = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
               "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
               "w = time.perf_counter() - t; "
               "print(json.dumps([r.returncode, w, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "
               "r.stderr[-2000:]]))")
    out = subprocess.run([PYTHON, "-c", wrapper, *map(str, cmd)], capture_output=True, text=True, env=mpi_env())
    code, wall, rss, err = json.loads(out.stdout)
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(map(str, cmd))}\n{err}")
    return wall, rss


def make_cohort(sample: Path, root: Path, subjects: int) -> list:
    """`subjects` subjects, alternating the two real brains, as symlinks under new names."""
    volumes = []
    for i in range(subjects):
        source = ("mni152", "colin27")[i % 2]
        name = f"sub{i:03d}"
        (root / name).mkdir(parents=True)
        for modality in ("t1", "seg"):
            target = root / name / f"{name}_{modality}.nii.gz"
            target.symlink_to(sample / source / f"{source}_{modality}.nii.gz")
            volumes.append(target)
    return volumes


def reading_rates(dataset: Path, items: int) -> tuple:
    """(SliceDataset images/s, plain h5py images/s) over the same shuffled rows."""
    import h5py
    import numpy as np

    from hpcgan.data import SliceDataset

    ds = SliceDataset(dataset, "train")
    order = np.random.default_rng(0).permutation(len(ds))[:items]
    rows = [ds.locate(int(i)) for i in order]
    images = {name: h5py.File(dataset / name, "r")["images"] for name in ds.shard_names}
    def read_plain():
        for name, row in rows:
            images[name][row]

    def read_dataset():
        for i in order:
            ds[int(i)]

    read_plain()  # warm the page cache for both
    return items / best_time(read_dataset), items / best_time(read_plain)


def best_time(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 subjects at 64x64")
    parser.add_argument("--subjects", type=int, default=None, help="cohort size (default 16, --quick 4)")
    parser.add_argument("--size", type=int, default=None, help="output size (default 256, --quick 64)")
    args = parser.parse_args()
    subjects = args.subjects or (4 if args.quick else 16)
    size = args.size or (64 if args.quick else 256)

    with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
        tmp = Path(tmp)
        subprocess.run([PYTHON, "-m", "hpcgan", "sample-data", tmp / "sample"], check=True, env=mpi_env(),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        volumes = make_cohort(tmp / "sample", tmp / "cohort", subjects)
        common = ["--input", tmp / "cohort", "--modalities", "t1", "--mask", "seg", "--size", size,
                  "--shards", 8, "--val-fraction", "0.1"]
        load_script = ("import sys, nibabel as nib\n"
                       "for p in sys.argv[1:]: nib.load(p).get_fdata()\n")
        import nibabel as nib
        import numpy as np

        largest = max(int(np.prod(nib.load(p).shape)) * 8 for p in volumes)  # get_fdata is float64

        # Warm the page cache so both sides read from memory.
        timed([PYTHON, "-c", load_script, *volumes])
        t_load, _ = min(timed([PYTHON, "-c", load_script, *volumes]) for _ in range(2))
        runs1, runs2 = [], []
        for i in range(2):
            runs1.append(timed([PYTHON, "-m", "hpcgan", "preprocess", *common, "--output", tmp / f"one{i}"]))
            runs2.append(timed(["mpirun", "-np", 2, "--oversubscribe", "--bind-to", "none", PYTHON, "-m", "hpcgan",
                                "preprocess", *common, "--output", tmp / f"two{i}"]))
        (t1, rss1), (t2, rss2) = min(runs1), min(runs2)
        manifest = json.loads((tmp / "one0" / "manifest.json").read_text())
        slices = manifest["splits"]["train"]["slices"] + manifest["splits"]["val"]["slices"]
        ds_rate, h5_rate = reading_rates(tmp / "one0", min(2000, manifest["splits"]["train"]["slices"]))

    rows = [
        ("cohort", f"{subjects} subjects x (t1 + seg) = {len(volumes)} volumes -> {slices} slices at {size}x{size}", ""),
        ("nibabel get_fdata of all volumes", f"{t_load:.2f} s", ""),
        ("hpcgan preprocess, 1 rank", f"{t1:.2f} s, {slices / t1:.0f} slices/s", ""),
        ("  wall / get_fdata wall", f"{t1 / t_load:.2f}", "goal <= 1.5"),
        ("hpcgan preprocess, 2 ranks", f"{t2:.2f} s, {slices / t2:.0f} slices/s", ""),
        ("  speed-up 2 ranks / 1 rank", f"{t1 / t2:.2f}", "goal >= 1.7"),
        ("peak RSS per rank (1 rank | 2 ranks)", f"{rss1 / 2**20:.0f} MiB | {rss2 / 2**20:.0f} MiB", ""),
        ("largest decoded volume (float64)", f"{largest / 2**20:.0f} MiB", ""),
        ("  peak RSS / largest volume", f"{max(rss1, rss2) / largest:.2f}", "goal <= 3"),
        ("SliceDataset reads", f"{ds_rate:.0f} images/s", ""),
        ("plain h5py reads, same rows", f"{h5_rate:.0f} images/s", ""),
        ("  SliceDataset / h5py", f"{ds_rate / h5_rate:.2f}", ""),
    ]
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'measure':{width}s}  {'value':{vwidth}s}  goal")
    for name, value, goal in rows:
        print(f"{name:{width}s}  {value:{vwidth}s}  {goal}")


if __name__ == "__main__":
    main()
