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
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def mpi_env() -> dict:
    env = dict(os.environ)
    env.update(
        {
            "OMPI_ALLOW_RUN_AS_ROOT": "1",
            "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
            "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
            "OMPI_MCA_rmaps_base_oversubscribe": "1",
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "PYTHONPATH": str(REPO),
        }
    )
    return env


def timed(cmd) -> tuple:
    """(wall seconds, peak RSS in bytes of the largest process it started, the largest
    per-rank process CPU seconds that `hpcgan preprocess --debug` logs (or 0), CPU seconds of
    all its processes), in a fresh wrapper so getrusage(RUSAGE_CHILDREN) sees only this
    command's processes."""
    wrapper = (
        "import resource, subprocess, sys, time, json; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
        "w = time.perf_counter() - t; "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(json.dumps([r.returncode, w, u.ru_maxrss * 1024, u.ru_utime + u.ru_stime, r.stderr]))"
    )
    out = subprocess.run([PYTHON, "-c", wrapper, *map(str, cmd)], capture_output=True, text=True, env=mpi_env())
    code, wall, rss, cpu_total, err = json.loads(out.stdout)
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(map(str, cmd))}\n{err[-3000:]}")
    cpu = [float(m) for m in re.findall(r"process CPU ([0-9.]+) s", err)]
    return wall, rss, max(cpu, default=0.0), cpu_total


GEMM_LOOP = "import numpy as np\na = np.random.rand(300, 300).astype(np.float32)\nfor _ in range(1500): a @ a\n"


def parallel_ceiling() -> float:
    """Speed-up of 2 concurrent single-threaded numpy processes over 1 on this machine: the
    most any 2-rank run can reach here (cores shared with other jobs or SMT siblings give < 2)."""

    def wall(n):
        start = time.perf_counter()
        procs = [subprocess.Popen([PYTHON, "-c", GEMM_LOOP], env=mpi_env()) for _ in range(n)]
        for p in procs:
            p.wait()
        return time.perf_counter() - start

    one = min(wall(1) for _ in range(2))
    two = min(wall(2) for _ in range(2))
    return 2 * one / two


def count_slices(dataset: Path) -> int:
    splits = json.loads((dataset / "manifest.json").read_text())["splits"]
    return sum(split["slices"] for split in splits.values())


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

    import torch

    from hpcgan.data import SliceDataset

    torch.set_num_threads(1)  # as in a DataLoader worker
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
    parser.add_argument("--subjects", type=int, default=None, help="cohort size (default 48, --quick 4)")
    parser.add_argument("--size", type=int, default=None, help="output size (default 256, --quick 64)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the best of each is shown")
    args = parser.parse_args()
    subjects = args.subjects or (4 if args.quick else 48)
    size = args.size or (64 if args.quick else 256)

    with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
        tmp = Path(tmp)
        subprocess.run(
            [PYTHON, "-m", "hpcgan", "sample-data", tmp / "sample"],
            check=True,
            env=mpi_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        volumes = make_cohort(tmp / "sample", tmp / "cohort", subjects)
        common = [
            "--input",
            tmp / "cohort",
            "--modalities",
            "t1",
            "--mask",
            "seg",
            "--size",
            size,
            "--shards",
            16,
            "--val-fraction",
            "0.1",
        ]  # shards >> ranks: ranks finish together
        load_script = "import sys, nibabel as nib\nfor p in sys.argv[1:]: nib.load(p).get_fdata()\n"
        import nibabel as nib
        import numpy as np

        largest = max(int(np.prod(nib.load(p).shape)) * 8 for p in volumes)  # get_fdata is float64

        commands = {
            "load": [PYTHON, "-c", load_script, *volumes],
            "one": [PYTHON, "-m", "hpcgan", "preprocess", "--debug", *common],
            "ref": [PYTHON, "-m", "hpcgan", "preprocess", *common, "--slices", "60:108"],
            "two": [
                "mpirun",
                "-np",
                2,
                "--oversubscribe",
                "--bind-to",
                "none",
                PYTHON,
                "-m",
                "hpcgan",
                "preprocess",
                "--debug",
                *common,
            ],
        }
        timed(commands["load"])  # warm the page cache so every run reads from memory
        runs = {name: [] for name in commands}
        for i in range(args.repeats):  # interleaved, best of N: the machine may be shared
            for name, cmd in commands.items():
                runs[name].append(timed(cmd + ([] if name == "load" else ["--output", tmp / f"{name}{i}"])))
        (t_load, _, _, c_load), (t1, rss1, cpu1, c1), (t_ref, _, _, c_ref), (t2, rss2, cpu2, _) = (
            min(runs[name]) for name in ("load", "one", "ref", "two")
        )
        slices, ref_slices = (count_slices(tmp / name) for name in ("one0", "ref0"))
        assert count_slices(tmp / "two0") == slices
        train = json.loads((tmp / "one0" / "manifest.json").read_text())["splits"]["train"]["slices"]
        ds_rate, h5_rate = reading_rates(tmp / "one0", min(2000, train))
        ceiling = parallel_ceiling()

    rows = [
        ("cohort", f"{subjects} subjects x (t1 + seg) = {len(volumes)} volumes -> {slices} slices, {size}x{size}", ""),
        ("nibabel get_fdata of all volumes", f"{t_load:.2f} s", ""),
        ("hpcgan preprocess, 1 rank", f"{t1:.2f} s, {slices / t1:.0f} slices/s", ""),
        ("  wall / get_fdata wall (CPU s / CPU s)", f"{t1 / t_load:.2f} ({c1 / c_load:.2f})", "goal <= 1.5"),
        ("same with --slices 60:108, 1 rank", f"{t_ref:.2f} s, {ref_slices / t_ref:.0f} slices/s", ""),
        ("  wall / get_fdata wall (CPU s / CPU s)", f"{t_ref / t_load:.2f} ({c_ref / c_load:.2f})", "goal <= 1.5"),
        ("hpcgan preprocess, 2 ranks", f"{t2:.2f} s, {slices / t2:.0f} slices/s", ""),
        ("  speed-up 2 ranks / 1 rank", f"{t1 / t2:.2f}", "goal >= 1.7"),
        ("  busiest rank's CPU s (1 rank | 2 ranks)", f"{cpu1:.2f} | {cpu2:.2f}", ""),
        ("  1-rank CPU s / busiest rank CPU s", f"{cpu1 / cpu2:.2f}" if cpu2 else "n/a", "goal >= 1.7"),
        ("  this machine's ceiling: 2 numpy GEMM loops", f"{ceiling:.2f}", "upper bound of any 2-rank speed-up"),
        ("peak RSS per rank (1 rank | 2 ranks)", f"{rss1 / 2**20:.0f} MiB | {rss2 / 2**20:.0f} MiB", ""),
        ("largest decoded volume (float64)", f"{largest / 2**20:.0f} MiB", ""),
        ("  peak RSS / largest volume", f"{max(rss1, rss2) / largest:.2f}", "goal <= 3"),
        ("SliceDataset reads (random rows, 1 thread)", f"{ds_rate:.0f} images/s", ""),
        ("plain h5py reads, same rows", f"{h5_rate:.0f} images/s", ""),
        ("  SliceDataset / h5py", f"{ds_rate / h5_rate:.2f}", ""),
    ]
    load = os.getloadavg()[0]
    rows.append(
        (
            "machine",
            f"{os.cpu_count()} cores, load average {load:.1f} at the end; best of {args.repeats} interleaved runs",
            "",
        )
    )
    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"{'measure':{width}s}  {'value':{vwidth}s}  goal")
    for name, value, goal in rows:
        print(f"{name:{width}s}  {value:{vwidth}s}  {goal}")


if __name__ == "__main__":
    main()
