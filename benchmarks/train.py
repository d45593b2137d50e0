"""Training throughput, measured in one run so that the ratios are fair on a noisy machine.

For the 256x256x3 study model (configs/cepa2023.yaml) and the 64x64 model (configs/wgan-gp-64.yaml):
  - per-rank images/s of `hpcgan train` on 1 rank, and the ratio of its step time to a bare PyTorch
    loop of the same networks, batch and loss on in-memory data (goal <= 1.10);
  - the fraction of wall time spent waiting for data from the HDF5 shards (goal < 5%);
  - weak scaling: 2 ranks x 1 thread against 1 rank x 1 thread at a fixed per-rank batch, Horovod and
    torch backends side by side (efficiency = per-rank images/s on 2 ranks / on 1 rank; goal >= 0.85),
    and the fraction of wall time a step waits for the gradient allreduce; beside them the machine's
    ceiling, two independent 1-rank runs at once (shared cores, caches and memory bandwidth).
Every process runs with one thread (OMP_NUM_THREADS=1), so 2 ranks need 2 free cores.

  .venv/bin/python benchmarks/train.py            # both models (several minutes on 2 cores)
  .venv/bin/python benchmarks/train.py --quick    # the 64x64 model only, few steps
  .venv/bin/python benchmarks/train.py --cuda     # GPU: the study model at 256x256x3 on cuda:0, fp32 and
                                                  # bf16, img/s of `hpcgan train` against the bare loop
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import sh, single_thread_env

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MODELS = {  # name: (config, preprocess flags, per-rank batch)
    "cepa2023 256x256x3": ("cepa2023", ["--size", "256", "--channels", "3"], 8),
    "wgan-gp-64 64x64x1": ("wgan-gp-64", ["--size", "64", "--channels", "1"], 8),
}


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


def hpcgan_train(dataset, run_dir, config, batch, steps, ranks=1, backend="none", extra=()):
    """Seconds per step (median over the steps after warm-up) and the mean wait fractions."""
    sh([*train_cmd(dataset, run_dir, config, batch, steps, ranks, backend), *extra])
    return read_run(run_dir, batch * ranks)


def machine_ceiling(dataset, run_dir, config, batch, steps, one):
    """Two independent 1-rank runs at once: what 2 processes get from this machine's cores and memory
    without any communication, the best weak-scaling efficiency 2 ranks could reach here."""
    cmds = [train_cmd(dataset, f"{run_dir}-{i}", config, batch, steps) for i in range(2)]
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
    return one / statistics.mean(read_run(f"{run_dir}-{i}", batch)[0] for i in range(2))


def train_cmd(dataset, run_dir, config, batch, steps, ranks=1, backend="none"):
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
        "log.every_steps=1",
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


def read_run(run_dir, global_batch):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    lines = [line for line in lines if "images_per_s" in line]
    steady = lines[2:]  # the first steps pay for allocation and Horovod's first negotiation
    step_s = statistics.median(global_batch / line["images_per_s"] for line in steady)
    return (
        step_s,
        statistics.mean(line["data_wait"] for line in steady),
        statistics.mean(line["allreduce_wait"] for line in steady),
    )


def bare_loop(config, batch, steps, device="cpu", amp="none"):
    """The same networks, batch and loss with nothing around them: in-memory data, plain Adam (on a GPU:
    data and latents made on the device, one synchronize per step so that the timer sees the work)."""
    import contextlib

    import torch

    from hpcgan.config import load_config
    from hpcgan.losses import d_loss, g_loss
    from hpcgan.models import build_discriminator, build_generator
    from hpcgan.training.config import Config

    torch.set_num_threads(1)
    cfg = load_config(Config, config)
    torch.manual_seed(0)
    device = torch.device(device)
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
    return statistics.median(times[2:])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="64x64 model only, few steps")
    parser.add_argument("--steps", type=int, default=0, help="steps per measurement (default 8, quick 12)")
    parser.add_argument("--cuda", action="store_true", help="GPU: the study model on cuda:0 (fp32, bf16)")
    parser.add_argument(
        "--bare", nargs=5, metavar=("CONFIG", "BATCH", "STEPS", "DEVICE", "AMP"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.bare:  # child process: one thread, nothing else running in it
        config, batch, steps, device, amp = args.bare
        print(json.dumps({"step_s": bare_loop(config, int(batch), int(steps), device, amp)}))
        return
    if args.cuda:
        return cuda_main(args.steps or 40)
    models = {k: v for k, v in MODELS.items() if not args.quick or "64" in k}
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
        tmp = Path(tmp)
        for name, (config, flags, batch) in models.items():
            steps = args.steps or (12 if args.quick or "64" in name else 8)
            data = make_dataset(tmp, flags)
            bare = bare_step_s(config, batch, steps)
            one, data_wait, _ = hpcgan_train(data, tmp / f"{config}-1", config, batch, steps)
            row = {
                "model": name,
                "batch/rank": batch,
                "img/s/rank 1r": batch / one,
                "hpcgan/bare": one / bare,
                "data wait": data_wait,
            }
            row["ceiling"] = machine_ceiling(data, tmp / f"{config}-1x2", config, batch, steps, one)
            for backend in ("horovod", "torch"):
                two, _, allreduce = hpcgan_train(data, tmp / f"{config}-2-{backend}", config, batch, steps, 2, backend)
                row[f"eff {backend}"] = one / two
                row[f"allreduce {backend}"] = allreduce
            rows.append(row)
            print_table(rows)


def bare_step_s(config, batch, steps, device="cpu", amp="none"):
    out = sh([PY, __file__, "--bare", config, batch, steps, device, amp])
    return json.loads(out.strip().splitlines()[-1])["step_s"]


def cuda_main(steps):
    """The study model on one GPU: `hpcgan train --device cuda` against the bare loop, fp32 and bf16."""
    name, (config, flags, batch) = next(iter(MODELS.items()))
    rows = []
    with tempfile.TemporaryDirectory(prefix="hpcgan-bench-") as tmp:
        data = make_dataset(Path(tmp), flags)
        for amp in ("none", "bf16"):
            bare = bare_step_s(config, batch, steps, "cuda", amp)
            one, data_wait, _ = hpcgan_train(
                data,
                Path(tmp) / f"cuda-{amp}",
                config,
                batch,
                steps,
                extra=["--device", "cuda", "--set", f"train.amp={amp}"],
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
    print_table(rows)


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
