"""Small datasets (issue 14): the memorisation guard on checkpoints/best, the stop on memorisation, and
fine-tuning with --init-from.

A GAN trained for a few hundred steps on the shipped sample data is not flagged by the memorisation audit:
the validation brain (Colin27) lies so close to the training template (MNI152) that a generated image must
be nearer a training slice than almost any real validation slice is. The audit's threshold comes from the
validation split, so a validation brain flipped front to back (further from the training slices) lets a
tiny generator cross it within ~150 steps: memorisation rises during the run while the SWD keeps falling,
which is the case the guard is for. Everything else is the real training, evaluation and checkpointing."""

import hashlib
import json
import math
import shutil

import pytest
import torch

from conftest import SAMPLE_DATASET_OPTIONS, requires_mpirun, run_hpcgan, run_hpcgan_mpi
from hpcgan.training.checkpointing import CheckpointWriter, best_entry, read_index
from test_train import PURE, train_args

GUARD = 0.2
STOP_AFTER = 2
# The memorised run: evaluations every 25 steps, each with a checkpoint (keep=1: the last one and the best).
MEMORISED = [
    "optim.lr=1e-3",
    "log.every_steps=25",
    "eval.every_steps=25",
    "eval.metrics=[swd,memorization]",
    "eval.num_images=64",
    "checkpoint.every_steps=25",
    "checkpoint.keep=1",
    f"checkpoint.max_memorization={GUARD}",
    f"train.stop_on_memorization={STOP_AFTER}",
]
MAX_STEPS = 300


@pytest.fixture(scope="module")
def flipped_val_dataset(sample_data, tmp_path_factory):
    """The sample dataset with its validation brain (Colin27) flipped front to back."""
    import nibabel as nib
    import numpy as np

    root = tmp_path_factory.mktemp("flipped")
    shutil.copytree(sample_data / "mni152", root / "raw" / "mni152")
    (root / "raw" / "colin27").mkdir()
    for modality in ("t1", "seg"):
        image = nib.load(sample_data / "colin27" / f"colin27_{modality}.nii.gz")
        flipped = np.ascontiguousarray(np.asanyarray(image.dataobj)[:, ::-1, :])
        path = root / "raw" / "colin27" / f"colin27_{modality}.nii.gz"
        nib.save(nib.Nifti1Image(flipped, image.affine, image.header), path)
    out = root / "dataset"
    run_hpcgan("preprocess", "--input", root / "raw", "--output", out, *SAMPLE_DATASET_OPTIONS, check=True, timeout=300)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["subjects"]["colin27"]["shard"].startswith("val")  # the flipped brain validates
    return out


def evaluations(run_dir) -> list:
    """[(step, swd, memorization)] of the evaluations a run recorded in metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e["eval"]["swd"]["value"], e["eval"]["memorization"]["value"]) for e in lines if "eval" in e]


@pytest.fixture(scope="module")
def memorised_run(flipped_val_dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("memorised") / "run"
    result = run_hpcgan(*train_args(flipped_val_dataset, run, MAX_STEPS, *MEMORISED), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


# --- the selection rule ----------------------------------------------------------------------------------
# Evaluations recorded by a memorised run (step, swd, memorization): SWD falls while memorisation rises.
RECORDED = [(100, 163.2, 0.0), (125, 132.8, 0.0625), (150, 126.0, 0.3906), (175, 104.2, 0.3594)]


def entries(recorded) -> list:
    return [{"file": f"ckpt-{s:08d}.pt", "step": s, "metrics": {"swd": v, "memorization": m}} for s, v, m in recorded]


def test_best_entry_skips_memorised_evaluations():
    assert best_entry(entries(RECORDED), "swd")["step"] == 175  # unguarded: the most memorised one
    assert best_entry(entries(RECORDED), "swd", max_memorization=GUARD)["step"] == 125
    assert best_entry(entries(RECORDED), "swd", max_memorization=0.0625)["step"] == 125  # at the threshold: passes
    assert best_entry(entries(RECORDED), "swd", max_memorization=0.01)["step"] == 100
    assert best_entry(entries(RECORDED[2:]), "swd", max_memorization=GUARD) is None
    unmeasured = [{"file": "a", "step": 1, "metrics": {"swd": 1.0}}, *entries([(2, 9.0, math.nan)])]
    assert best_entry(unmeasured, "swd", max_memorization=GUARD) is None  # not measured never passes


def test_writer_keeps_no_best_until_a_checkpoint_passes_the_guard(tmp_path):
    writer = CheckpointWriter(tmp_path, keep_last=1, best_metric="swd", max_memorization=GUARD)
    for step, swd, memorization in [(1, 5.0, 0.5), (2, 1.0, 0.1), (3, 0.5, 0.9)]:
        writer.submit({"x": torch.zeros(2)}, step, metrics={"swd": swd, "memorization": memorization})
        writer.flush()
        if step == 1:
            assert not (tmp_path / "best").exists()
    assert (tmp_path / "best").read_text().strip() == "ckpt-00000002.pt"
    assert [e["step"] for e in read_index(tmp_path)] == [2, 3]  # the best is kept beside the last


# --- a real run ---------------------------------------------------------------------------------------------
def test_guarded_best_skips_a_memorised_evaluation(memorised_run):
    run, result = memorised_run
    recorded = evaluations(run)
    index = {e["step"]: e for e in read_index(run / "checkpoints")}
    passing = [(swd, step) for step, swd, mem in recorded if mem <= GUARD]
    memorised = [(swd, step) for step, swd, mem in recorded if mem > GUARD]
    # The guard matters here: a memorised evaluation is more realistic than every one that passes.
    assert passing and memorised and min(memorised) < min(passing), recorded
    best = (run / "checkpoints" / "best").read_text().strip()
    assert best == f"ckpt-{min(passing)[1]:08d}.pt" and min(passing)[1] in index
    assert index[min(passing)[1]]["metrics"]["memorization"] <= GUARD
    for _, step in memorised:
        assert f"step {step}: memorization" in result.stderr and "cannot become checkpoints/best" in result.stderr


def expected_stop(recorded) -> int:
    """The step of the first evaluation that completes STOP_AFTER in a row above the guard."""
    over = [mem > GUARD for _, _, mem in recorded]
    return next(recorded[i][0] for i in range(STOP_AFTER - 1, len(over)) if all(over[i - STOP_AFTER + 1 : i + 1]))


def test_stop_on_memorization_ends_the_run_cleanly(memorised_run):
    run, result = memorised_run
    recorded = evaluations(run)
    stop = expected_stop(recorded)
    assert stop < MAX_STEPS and recorded[-1][0] == stop  # no evaluation after the stop
    stops = [line for line in result.stderr.splitlines() if "train.stop_on_memorization" in line]
    assert len(stops) == 1 and f"stopping at step {stop}:" in stops[0] and f"in {STOP_AFTER} evaluations" in stops[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"ckpt-{stop:08d}.pt"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(line["step"] for line in lines) == stop and "Traceback" not in result.stderr


def test_report_and_sweep_summary_show_the_selected_checkpoint(memorised_run, tmp_path, capsys, cli_in_process):
    run, _ = memorised_run
    best_step = int((run / "checkpoints" / "best").read_text().strip()[5:13])
    entry = next(e for e in read_index(run / "checkpoints") if e["step"] == best_step)
    assert cli_in_process(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    section = page[page.index("<h2>Selected checkpoint</h2>") :][:1500]
    assert f"ckpt-{best_step:08d}.pt" in section and "memorization &lt;= 0.2" in section
    assert f"{entry['metrics']['swd']:.4g}" in section and f"{entry['metrics']['memorization']:.4g}" in section
    # A run whose every evaluation was memorised: no best, and the sweep summary says so.
    none_passed = tmp_path / "none-passed"
    (none_passed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", none_passed / "config.yaml")
    shutil.copy(run / "checkpoints" / "checkpoints.json", none_passed / "checkpoints" / "checkpoints.json")
    capsys.readouterr()
    assert cli_in_process(["sweep-summary", str(run), str(none_passed), "--metric", "swd"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:6] == ["rank", "run", "swd", "step", "memorization", "guard"]
    assert lines[1].split()[:7] == [
        "1",
        "run",
        f"{entry['metrics']['swd']:.6g}",
        str(best_step),
        f"{entry['metrics']['memorization']:.4g}",
        "<=",
        "0.2",
    ]
    assert lines[2].split()[:3] == ["-", "none-passed", "no"] and "(none passed)" in lines[2]


def test_sampling_the_run_directory_uses_the_guarded_best(memorised_run, tmp_path):
    """The run stopped on memorisation, so its newest checkpoint is one the guard rejected: `sample
    --checkpoint RUN` takes checkpoints/best and says so; RUN/checkpoints/latest takes the newest."""
    run, _ = memorised_run
    best_step = int((run / "checkpoints" / "best").read_text().strip()[5:13])
    latest_step = int((run / "checkpoints" / "latest").read_text().strip()[5:13])
    assert best_step < latest_step
    common = ["sample", "--num-stacks", 1, "--stack-size", 4, "--format", "h5"]
    result = run_hpcgan(*common, "--checkpoint", run, "--out", tmp_path / "best", check=True)
    assert json.loads((tmp_path / "best" / "index.json").read_text())["step"] == best_step
    assert f"step {best_step}: best swd" in result.stderr and f"<= guard {GUARD:g}" in result.stderr
    run_hpcgan(*common, "--checkpoint", run / "checkpoints" / "latest", "--out", tmp_path / "latest", check=True)
    assert json.loads((tmp_path / "latest" / "index.json").read_text())["step"] == latest_step


@pytest.mark.mpi
@requires_mpirun
def test_two_ranks_stop_together_on_memorization(flipped_val_dataset, tmp_path):
    run = tmp_path / "run"
    result = run_hpcgan_mpi(
        2, *train_args(flipped_val_dataset, run, MAX_STEPS, *MEMORISED, "train.batch_size=2"), timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stops = [line for line in result.stderr.splitlines() if "train.stop_on_memorization" in line]
    assert len(stops) == 1, result.stderr[-3000:]  # rank 0 says it once; every rank left with 0
    stop = expected_stop(evaluations(run))
    assert stop < MAX_STEPS and evaluations(run)[-1][0] == stop and f"stopping at step {stop}:" in stops[0]
    assert (run / "checkpoints" / "latest").read_text().strip() == f"ckpt-{stop:08d}.pt"


# --- configuration errors ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "sets, needle",
    [
        (["checkpoint.max_memorization=0.05"], "checkpoint.max_memorization needs evaluation"),
        (["eval.every_steps=2", "checkpoint.max_memorization=0.05"], "'memorization' in eval.metrics"),
        (["train.stop_on_memorization=2"], "train.stop_on_memorization needs its threshold"),
        (["checkpoint.max_memorization=1.5"], "checkpoint.max_memorization: must be in [0, 1)"),
        (["train.stop_on_memorization=-1"], "train.stop_on_memorization: must be >= 0"),
    ],
)
def test_guard_config_errors(sample_dataset, tmp_path, capsys, cli_in_process, sets, needle):
    assert cli_in_process([*map(str, train_args(sample_dataset, tmp_path / "run", 2, *sets))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "run").exists()


def test_guard_needs_a_validation_split(sample_data, tmp_path, capsys, cli_in_process):
    options = [o for o in SAMPLE_DATASET_OPTIONS if o not in ("--val-fraction", "0.5")]
    dataset = tmp_path / "no-val"
    run_hpcgan("preprocess", "--input", sample_data, "--output", dataset, *options, "--val-fraction", "0", check=True)
    sets = ["eval.every_steps=2", "eval.metrics=[swd,memorization]", "checkpoint.max_memorization=0.05"]
    assert cli_in_process([*map(str, train_args(dataset, tmp_path / "run", 2, *sets))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a validation split" in err[0] and not (tmp_path / "run").exists()


# --- fine-tuning --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source_run(sample_dataset, tmp_path_factory):
    """A tiny run on the sample data: the checkpoint to fine-tune from."""
    run = tmp_path_factory.mktemp("source") / "run"
    run_hpcgan(*train_args(sample_dataset, run, 3, *PURE), check=True)
    return run


def source_checkpoint(run):
    path = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    return path, torch.load(path, map_location="cpu", weights_only=True)


def test_init_from_refuses_a_mismatched_model(source_run, flipped_val_dataset, tmp_path, capsys, cli_in_process):
    out = tmp_path / "fine"
    args = train_args(flipped_val_dataset, out, 2, *PURE, "model.g_base_width=16")
    assert cli_in_process([*map(str, args), "--init-from", str(source_run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--init-from" in lines[0] and "model.g_base_width: 8 there, 16 now" in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize(
    "with_optimizer, ranks", [(False, 1), (True, 1), pytest.param(True, 2, marks=[pytest.mark.mpi, requires_mpirun])]
)
def test_init_from_trains_from_a_matching_checkpoint(source_run, flipped_val_dataset, tmp_path, with_optimizer, ranks):
    """Another dataset, step counter from 0: with a learning rate too small to move a weight, the first step's
    networks are the source's (G-EMA is the source's G-EMA taking its first, warm-up, average with G). On 2
    ranks both replicas start from it (a checkpoint refuses replicas that differ)."""
    path, source = source_checkpoint(source_run)
    out = tmp_path / "fine"
    flags = ["--init-from", source_run, *(["--init-from-optimizer"] if with_optimizer else [])]
    args = [*train_args(flipped_val_dataset, out, 1, *PURE, "optim.lr=1e-30", f"train.batch_size={4 // ranks}"), *flags]
    if ranks == 1:
        run_hpcgan(*args, check=True)
    else:
        run_hpcgan_mpi(ranks, *args, check=True, timeout=300)
    ckpt = torch.load(out / "checkpoints" / "ckpt-00000001.pt", map_location="cpu", weights_only=True)
    assert ckpt["step"] == 1 and source["step"] == 3
    for net in ("G", "D"):
        for key, value in source[net].items():
            assert torch.equal(ckpt[net][key], value), (net, key)
    for key, value in source["G_ema"].items():  # EMA warm-up at step 0: decay min(0.9, 1/10)
        torch.testing.assert_close(ckpt["G_ema"][key], value.lerp(source["G"][key], 0.9), rtol=0, atol=1e-7)
    adam_steps = {float(s["step"]) for s in ckpt["opt_D"]["state"].values()}
    assert adam_steps == ({source["step"] + 1.0} if with_optimizer else {1.0})
    assert ckpt["opt_D"]["param_groups"][0]["lr"] == 1e-30  # this run's schedule, not the source's
    record = {"sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "step": 3, "optimizer": with_optimizer}
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "init_from": record} and ckpt["init_from"] == record
    assert str(source_run) not in (out / "metrics.jsonl").read_text()  # the source by its hash, not its path


def test_init_from_with_resume(source_run, flipped_val_dataset, tmp_path, capsys, cli_in_process):
    path, _ = source_checkpoint(source_run)
    out = tmp_path / "fine"
    args = train_args(flipped_val_dataset, out, 1, *PURE)
    assert cli_in_process([*map(str, args), "--init-from", str(source_run), "--resume", str(path)]) == 2
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1 and "--init-from: cannot be combined with --resume PATH" in refused[0]
    assert not out.exists()
    run_hpcgan(*args, "--init-from", source_run, check=True)
    # --resume auto continues this fine-tuning run (the same command after a preemption) ...
    longer = train_args(flipped_val_dataset, out, 2, *PURE)
    run_hpcgan(*longer, "--init-from", source_run, "--resume", "auto", check=True)
    assert (out / "checkpoints" / "latest").read_text().strip() == "ckpt-00000002.pt"
    # ... but not a run that was fine-tuned from another checkpoint.
    capsys.readouterr()
    other = out / "checkpoints" / "ckpt-00000002.pt"
    assert cli_in_process([*map(str, longer), "--init-from", str(other), "--resume", "auto"]) == 2
    assert "not fine-tuned from this checkpoint" in capsys.readouterr().err
