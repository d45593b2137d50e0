"""Training throughput, measured in one run so that the ratios are fair on a noisy machine.

For the 256x256x3 study model (configs/cepa2023.yaml), the 64x64 model (configs/wgan-gp-64.yaml) and StyleGAN2
at 64x64 (configs/stylegan2-64.yaml):
  - per-rank images/s of `hpcgan train` on 1 rank, and the ratio of its step time to a bare PyTorch
    loop of the same networks, batch and loss on in-memory data (goal <= 1.10); StyleGAN2's bare loop is its
    whole recipe written out plainly (benchmarks/bare_stylegan2.py), and both sides are timed in whole periods
    of its lazy regularisers (16 steps: one R1 step and four path-length steps each), the first one warm-up;
  - the fraction of wall time spent waiting for data from the HDF5 shards (goal < 5%);
  - weak scaling: 2 ranks x 1 thread against 1 rank x 1 thread at a fixed per-rank batch, Horovod and
    torch backends side by side (efficiency = per-rank images/s on 2 ranks / on 1 rank; goal >= 0.85),
    and the fraction of wall time a step waits for the gradient allreduce; beside them the machine's
    ceiling, two independent 1-rank runs at once (shared cores, caches and memory bandwidth).
Every process runs with one thread (OMP_NUM_THREADS=1), so 2 ranks need 2 free cores.

  .venv/bin/python benchmarks/train.py            # every CPU model (several minutes on 2 cores)
  .venv/bin/python benchmarks/train.py --quick    # the 64x64 models only, few steps
  .venv/bin/python benchmarks/train.py --models stylegan2-64   # some models only (config names)
  .venv/bin/python benchmarks/train.py --cuda     # GPU: the study model and StyleGAN2 (configs/stylegan2-256.yaml)
                                                  # at 256x256x3 on cuda:0, fp32 and mixed precision (bf16, and
                                                  # fp16 for StyleGAN2), img/s of `hpcgan train` against the bare loop
"""

import argparse
import contextlib
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import bare_stylegan2
import torch
from harness import sh, single_thread_env

from hpcgan.config import load_config
from hpcgan.losses import d_loss, g_loss
from hpcgan.models import build_discriminator, build_generator
from hpcgan.training.config import Config

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MODELS = {  # name: (config, preprocess flags, per-rank batch)
    "cepa2023 256x256x3": ("cepa2023", ["--size", "256", "--channels", "3"], 8),
    "wgan-gp-64 64x64x1": ("wgan-gp-64", ["--size", "64", "--channels", "1"], 8),
    "stylegan2-64 64x64x1": ("stylegan2-64", ["--size", "64", "--channels", "1"], 8),
    "stylegan2-256 256x256x3": ("stylegan2-256", ["--size", "256", "--channels", "3"], 8),
}
CPU_MODELS = ("cepa2023 256x256x3", "wgan-gp-64 64x64x1", "stylegan2-64 64x64x1")
# --cuda: name -> train.amp values (bf16 only where the GPU has it; fp16 is what StyleGAN2's reference runs).
CUDA_MODELS = {"cepa2023 256x256x3": ("none", "bf16"), "stylegan2-256 256x256x3": ("none", "bf16", "fp16")}


def make_dataset(root: Path, flags) -> Path:
    mri = root / "mri"
    if not mri.exists():
        sh([PY, "-m", "hpcgan", "sample-data", mri])
    out = root / ("data-" + "-".join(flags).replace("--", ""))
    if not out.exists():
        sh(
            [
                PY,
                "-m",
                "hpcgan",
                "preprocess",
                "--input",
                mri,
                "--output",
                out,
                "--modalities",
                "t1",
                "--slices",
                "60:108",
                "--val-fraction",
                "0",
                *flags,
            ]
        )
    return out


def hpcgan_train(dataset, run_dir, config, batch, steps, ranks=1, backend="none", extra=(), period=1):
    """Seconds per step (median over the steady log lines, read_run) and the mean wait fractions."""
    sh([*train_cmd(dataset, run_dir, config, batch, steps, ranks, backend, period), *extra])
    return read_run(run_dir, batch * ranks, period)


def machine_ceiling(dataset, run_dir, config, batch, steps, one, period=1):
    """Two independent 1-rank runs at once: what 2 processes get from this machine's cores and memory
    without any communication, the best weak-scaling efficiency 2 ranks could reach here."""
    cmds = [train_cmd(dataset, f"{run_dir}-{i}", config, batch, steps, period=period) for i in range(2)]
    procs = [
        subprocess.Popen(
            [str(c) for c in cmd], env=single_thread_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        for cmd in cmds
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=1800)
        if proc.returncode:
            sys.exit(f"benchmark step failed (concurrent 1-rank run)\n{err[-3000:]}")
    return one / statistics.mean(read_run(f"{run_dir}-{i}", batch, period)[0] for i in range(2))


def train_cmd(dataset, run_dir, config, batch, steps, ranks=1, backend="none", period=1):
    """`hpcgan train` logging every `period` steps (a log line per period of lazy regularisers)."""
    cmd = [
        PY,
        "-m",
        "hpcgan",
        "train",
        "--config",
        config,
        "--data",
        dataset,
        "--out",
        run_dir,
        "--backend",
        backend,
        "--set",
        f"train.steps={steps}",
        "--set",
        f"train.batch_size={batch}",
        "--set",
        f"log.every_steps={period}",
        "--set",
        "log.sample_every_steps=0",
        "--set",
        "log.tensorboard=false",
        "--set",
        "checkpoint.every_steps=0",
        "--set",
        "train.ema_decay=0.999",
        "--set",
        "eval.every_steps=0",
    ]
    if ranks > 1:
        cmd = ["mpirun", "-np", ranks, "--oversubscribe", "--bind-to", "none", *cmd]
    return cmd


def lazy_period(config) -> int:
    """Steps per timed unit: 1, or a whole period of the recipe's lazy regularisers (StyleGAN2: 16)."""
    return bare_stylegan2.lazy_period(load_config(Config, config))


def whole_periods(steps, period) -> int:
    """`steps` without lazy regularisers; with them whole periods, one of warm-up and at least two timed."""
    return steps if period == 1 else period * (1 + max(2, math.ceil(steps / period)))


def steady(values, period):
    """Per-step figures without the first 2 steps (allocation, Horovod's first negotiation); per-period
    figures without the first period (which holds those steps)."""
    return values[2:] if period == 1 else values[1:]


def read_run(run_dir, global_batch, period=1):
    """Median seconds per step over the steady log lines (one per `period` steps) and the mean waits."""
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steady_lines = steady([line for line in lines if "images_per_s" in line], period)
    step_s = statistics.median(global_batch / line["images_per_s"] for line in steady_lines)
    return (
        step_s,
        statistics.mean(line["data_wait"] for line in steady_lines),
        statistics.mean(line["allreduce_wait"] for line in steady_lines),
    )


def bare_loop(config, batch, steps, device="cpu", amp="none"):
    """Seconds per step of the same networks, batch and recipe with nothing around them, the median over the
    same steady steps (or periods) as read_run's: StyleGAN2's whole recipe (bare_stylegan2), else gan_step_times."""
    cfg = load_config(Config, config)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as `hpcgan train` has it (training.loop.set_determinism)
    step_times = bare_stylegan2.step_times if cfg.loss.type == "stylegan2" else gan_step_times
    times, period = step_times(cfg, batch, steps, device, amp), bare_stylegan2.lazy_period(cfg)
    per_period = [statistics.mean(times[i : i + period]) for i in range(0, len(times), period)]
    return statistics.median(steady(per_period, period))


def gan_step_times(cfg, batch, steps, device, amp):
    """Seconds of each step of the networks and loss with plain Adam on in-memory data (on a GPU: data and
    latents made on the device, one synchronize per step so that the timer sees the work)."""
    G, D = build_generator(cfg.model).to(device), build_discriminator(cfg.model).to(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp == "bf16" else contextlib.nullcontext
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    o = cfg.optim
    opt_G = torch.optim.Adam(G.parameters(), o.lr, (o.beta1, o.beta2), weight_decay=o.weight_decay)
    opt_D = torch.optim.Adam(D.parameters(), o.lr, (o.beta1, o.beta2), weight_decay=o.weight_decay)
    m = cfg.model
    real = torch.rand(8 * batch, m.channels, m.resolution, m.resolution, device=device) * 2 - 1
    times = []
    for step in range(steps):
        sync()
        t0 = time.perf_counter()
        x = real[(step % 8) * batch : (step % 8 + 1) * batch]
        z = torch.randn(batch, m.latent_dim, device=device)
        with torch.no_grad(), autocast():
            fake = G(z, None)
        with autocast():
            loss, _ = d_loss(cfg.loss, D, x, fake)
        opt_D.zero_grad(set_to_none=True)
        loss.backward()
        opt_D.step()
        D.requires_grad_(False)
        with autocast():
            loss, _ = g_loss(cfg.loss, D, G(torch.randn(batch, m.latent_dim, device=device), None))
        opt_G.zero_grad(set_to_none=True)
        loss.backward()
        opt_G.step()
        D.requires_grad_(True)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64 models only, few steps")
    parser.add_argument(
        "--steps",
        type=int,
        default=0,
        help="steps per measurement (default 8, quick and 64x64 12, cuda 40; StyleGAN2: rounded up to whole "
        "periods of its lazy regularisers, plus one period of warm-up)",
    )
    parser.add_argument("--models", help="comma list of config names to measure (default: all of the run's)")
    parser.add_argument("--cuda", action="store_true", help="GPU: the 256x256x3 models on cuda:0 (fp32, mixed)")
    parser.add_argument(
        "--bare", nargs=5, metavar=("CONFIG", "BATCH", "STEPS", "DEVICE", "AMP"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.bare:  # child process: one thread, nothing else running in it
        config, batch, steps, device, amp = args.bare
        print(json.dumps({"step_s": bare_loop(config, int(batch), int(steps), device, amp)}))
        return
    names = selected(CUDA_MODELS if args.cuda else CPU_MODELS, args.models, parser)
    if args.cuda:
        return cuda_main(args.steps or 40, names)
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
        for name in names:
            if not args.quick or "64" in name:
                rows.append(cpu_row(Path(tmp), name, args.steps or (12 if args.quick or "64" in name else 8)))
                print_table(rows)


def selected(names, models, parser) -> list:
    """`names` whose config is in the comma list `models` (all of them without one)."""
    if not models:
        return list(names)
    wanted = models.split(",")
    known = {MODELS[name][0] for name in names}
    if set(wanted) - known:
        parser.error(f"--models: {', '.join(sorted(set(wanted) - known))} not among {', '.join(sorted(known))}")
    return [name for name in names if MODELS[name][0] in wanted]


def cpu_row(tmp, name, steps) -> dict:
    """One table row: 1 rank against the bare loop, the data wait, weak scaling on both backends."""
    config, flags, batch = MODELS[name]
    period = lazy_period(config)
    steps = whole_periods(steps, period)
    data = make_dataset(tmp, flags)
    bare = bare_step_s(config, batch, steps)
    one, data_wait, _ = hpcgan_train(data, tmp / f"{config}-1", config, batch, steps, period=period)
    row = {
        "model": name,
        "batch/rank": batch,
        "img/s/rank 1r": batch / one,
        "hpcgan/bare": one / bare,
        "data wait": data_wait,
    }
    row["ceiling"] = machine_ceiling(data, tmp / f"{config}-1x2", config, batch, steps, one, period)
    for backend in ("horovod", "torch"):
        run_dir = tmp / f"{config}-2-{backend}"
        two, _, allreduce = hpcgan_train(data, run_dir, config, batch, steps, 2, backend, period=period)
        row[f"eff {backend}"] = one / two
        row[f"allreduce {backend}"] = allreduce
    return row


def bare_step_s(config, batch, steps, device="cpu", amp="none"):
    out = sh([PY, __file__, "--bare", config, batch, steps, device, amp])
    return json.loads(out.strip().splitlines()[-1])["step_s"]


def cuda_main(steps, names):
    """The 256x256x3 models on one GPU: `hpcgan train --device cuda` against the bare loop, fp32 and mixed
    precision (bf16 where the GPU has it, as hpcgan.training.checks requires; fp16 with gradient scalers)."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
        for name in names:
            config, flags, batch = MODELS[name]
            period = lazy_period(config)
            n = whole_periods(steps, period)
            data = make_dataset(Path(tmp), flags)
            for amp in (a for a in CUDA_MODELS[name] if a != "bf16" or bf16):
                bare = bare_step_s(config, batch, n, "cuda", amp)
                extra = ["--device", "cuda", "--set", f"train.amp={amp}"]
                one, data_wait, _ = hpcgan_train(
                    data, Path(tmp) / f"cuda-{config}-{amp}", config, batch, n, extra=extra, period=period
                )
                rows.append(
                    {
                        "model": name,
                        "amp": amp,
                        "batch": batch,
                        "img/s hpcgan": batch / one,
                        "img/s bare": batch / bare,
                        "hpcgan/bare": one / bare,
                        "data wait": data_wait,
                    }
                )
                print_table(rows)  # row by row: what ran stays on screen when a later run fails
    if not bf16:
        print("bf16 skipped: this GPU has no bf16 (hpcgan train refuses train.amp=bf16 on it)")


def print_table(rows):
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print()
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))
    print(
        "goals: hpcgan/bare <= 1.10, data wait < 0.05, eff >= 0.85 (allreduce = fraction of wall time waiting "
        "for gradients; ceiling = efficiency of two independent 1-rank runs at once, the most this machine allows)"
    )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
