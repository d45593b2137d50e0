"""A run directory means the checkpoint the run selected (issue 24): `select_checkpoint` follows checkpoints/best,
which honours the memorisation guard, and `sample`, `evaluate`, `turing-test make` and `report` use it and say
which step and why in one line; RUN/checkpoints/latest asks for the newest; a run where no checkpoint passed
the guard is refused. And `evaluate --split test` scores the held-out test split of a dataset preprocessed with
--test-fraction.

The guarded run is written by the real CheckpointWriter (its guard picks `best`) with real generators of three
steps, whose evaluation values are given: step 75, the newest, is memorised (0.5 > guard 0.2), so best is
step 50 and the newest checkpoint is the one the guard rejected. Everything downstream is the real command."""

import json
import shutil

import pytest
import torch
import yaml

from conftest import requires_mpirun, run_hpcgan, run_hpcgan_mpi
from hpcgan.config import to_dict
from hpcgan.data import read_slices
from hpcgan.errors import UsageError
from hpcgan.generation import checkpoint_images
from hpcgan.metrics import evaluate
from hpcgan.models import build_generator
from hpcgan.models.config import ModelConfig
from hpcgan.stacks import read_stack_attrs
from hpcgan.training.checkpointing import CheckpointWriter, read_index, select_checkpoint

MODEL = ModelConfig(resolution=64, channels=1, latent_dim=16, g_base_width=8, max_width=32)
GUARD = 0.2
# (step, swd, memorization): the SWD falls while memorisation rises past the guard at the newest step.
EVALUATIONS = [(25, 30.0, 0.0), (50, 20.0, 0.1), (75, 10.0, 0.5)]
BEST, NEWEST = 50, 75


def write_run(run_dir, evaluations, guard=GUARD, evaluates=True):
    """A run directory: config.yaml and one real checkpoint of a small 64x64 generator per evaluation."""
    config = {"model": to_dict(MODEL), "train": {"seed": 0}, "eval": {"every_steps": 25 if evaluates else 0}}
    config["checkpoint"] = {"best_metric": "swd", "max_memorization": guard}
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    writer = CheckpointWriter(
        run_dir / "checkpoints",
        keep_last=1,
        best_metric="swd" if evaluates else None,
        max_memorization=guard if evaluates else None,
    )
    for step, swd, memorization in evaluations:
        torch.manual_seed(step)  # each step its own generator: the images tell the checkpoints apart
        state = {"config": config, "step": step, "G": build_generator(MODEL).state_dict()}
        writer.submit(state, step, metrics={"swd": swd, "memorization": memorization} if evaluates else None)
    writer.close()
    return run_dir


def entry(run_dir, step) -> dict:
    return next(e for e in read_index(run_dir / "checkpoints") if e["step"] == step)


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("guarded") / "run", EVALUATIONS)


@pytest.fixture(scope="module")
def none_passed(tmp_path_factory):
    return write_run(tmp_path_factory.mktemp("none-passed") / "run", [(25, 30.0, 0.3), (50, 20.0, 0.5)])


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


# --- the rule ------------------------------------------------------------------------------------------------
def test_select_checkpoint_follows_the_guarded_best(guarded_run, tmp_path):
    checkpoints = guarded_run / "checkpoints"
    best, newest = checkpoints / f"ckpt-{BEST:08d}.pt", checkpoints / f"ckpt-{NEWEST:08d}.pt"
    for given in (guarded_run, checkpoints, checkpoints / "best"):
        path, reason = select_checkpoint(given)
        assert path == best, given
        assert reason == (
            f"step {BEST}: best swd 20 of the evaluated checkpoints (checkpoints/best), memorization 0.1 <= guard 0.2 "
            "(checkpoint.max_memorization)"
        )
    assert select_checkpoint(checkpoints / "latest") == (
        newest,
        f"step {NEWEST}: the newest checkpoint (checkpoints/latest), as asked",
    )
    assert select_checkpoint(newest) == (newest, f"step {NEWEST}: the checkpoint file given")
    # A run that did not evaluate during training selected nothing: its newest valid checkpoint.
    plain = write_run(tmp_path / "plain", EVALUATIONS[:2], evaluates=False)
    path, reason = select_checkpoint(plain)
    assert path.name == "ckpt-00000050.pt" and "newest valid checkpoint" in reason and "did not evaluate" in reason
    # A damaged best is refused, never replaced by another checkpoint.
    damaged = tmp_path / "damaged"
    shutil.copytree(guarded_run, damaged)
    (damaged / "checkpoints" / best.name).write_bytes(best.read_bytes()[:5000])
    with pytest.raises(UsageError, match=r"sha256 does not match .*selected checkpoint.*checkpoints/latest"):
        select_checkpoint(damaged)


def test_a_run_where_no_checkpoint_passed_the_guard_is_refused_in_one_line(none_passed, sample_dataset, tmp_path):
    expected = (
        f"{none_passed}: no evaluated checkpoint passed the memorisation guard (memorization <= 0.2, "
        f"checkpoint.max_memorization), so the run selected none; pass {none_passed / 'checkpoints' / 'latest'} "
        "to use the newest checkpoint anyway"
    )
    out = tmp_path / "out"
    sample = run_hpcgan("sample", "--checkpoint", none_passed, "--out", out, "--stack-size", 2, "--format", "h5")
    assert sample.returncode == 2 and one_line(sample).endswith(expected) and not out.exists()
    evaluation = tmp_path / "evaluation.json"
    args = ["--data", sample_dataset, "--checkpoint", none_passed, "--metrics", "swd", "--out", evaluation]
    result = run_hpcgan("evaluate", *args, timeout=120)
    assert result.returncode == 2 and one_line(result).endswith(expected) and not evaluation.exists()
    # The newest, when asked for by name.
    latest = run_hpcgan(
        "sample",
        "--checkpoint",
        none_passed / "checkpoints" / "latest",
        "--out",
        out,
        "--stack-size",
        2,
        "--format",
        "h5",
    )
    assert latest.returncode == 0 and json.loads((out / "index.json").read_text())["step"] == 50


# --- every output ------------------------------------------------------------------------------------------
@pytest.mark.mpi
@requires_mpirun
def test_sample_evaluate_turing_test_and_report_use_the_selected_checkpoint(guarded_run, sample_dataset, tmp_path):
    best = entry(guarded_run, BEST)
    reason = f"step {BEST}: best swd 20 of the evaluated checkpoints"
    # sample on 2 ranks: the stacks come from step 50, and rank 0 alone says so.
    samples = guarded_run / "samples"
    args = ["sample", "--checkpoint", guarded_run, "--out", samples, "--num-stacks", 2, "--stack-size", 4]
    result = run_hpcgan_mpi(2, *args, "--format", "h5,png", check=True)
    assert result.stderr.count(reason) == 1, result.stderr
    index = json.loads((samples / "index.json").read_text())
    assert (index["step"], index["checkpoint_sha256"]) == (BEST, best["sha256"])
    assert index["checkpoint_selection"].startswith(reason)
    assert read_stack_attrs(samples / "stack-00001.h5")["step"] == BEST
    # evaluate --checkpoint RUN generates from step 50.
    out = tmp_path / "evaluation.json"
    evaluate_args = ["--data", sample_dataset, "--num-images", 8, "--metrics", "swd", "--max-real", 8, "--out", out]
    result = run_hpcgan("evaluate", "--checkpoint", guarded_run, *evaluate_args, check=True, timeout=120)
    generated = json.loads(out.read_text())["generated"]
    assert (generated["step"], generated["checkpoint_sha256"]) == (BEST, best["sha256"]) and reason in result.stderr
    # turing-test make --checkpoint RUN: the synthetic images of the session come from step 50.
    session = tmp_path / "session"
    make = ["turing-test", "make", "--data", sample_dataset, "--checkpoint", guarded_run, "--out", session, "--num", 4]
    result = run_hpcgan(*make, check=True, timeout=120)
    key = json.loads((tmp_path / "session.key.json").read_text())
    assert key["synthetic_source"] == {"checkpoint_sha256": best["sha256"], "step": BEST} and reason in result.stderr
    assert len(list((session / "images").iterdir())) == 4
    # report RUN: the selected checkpoint, and that the shown samples are its own.
    result = run_hpcgan("report", guarded_run, check=True)
    page = (guarded_run / "report.html").read_text()
    assert reason in result.stderr and f"Selected: {reason}" in page
    assert f"These samples came from the checkpoint of step {BEST}" in page and "Warning" not in page
    # Samples of the newest checkpoint (asked for by name) are flagged in the report.
    latest = tmp_path / "latest-samples"
    run_hpcgan(
        *args[:2],
        guarded_run / "checkpoints" / "latest",
        "--out",
        latest,
        "--stack-size",
        4,
        "--format",
        "h5,png",
        check=True,
    )
    assert json.loads((latest / "index.json").read_text())["step"] == NEWEST
    run_hpcgan("report", guarded_run, "--samples", latest, "--out", tmp_path / "report.html", check=True)
    page = (tmp_path / "report.html").read_text()
    assert (
        f"<b>Warning:</b> These samples came from the checkpoint of step {NEWEST}" in page
        and f"not the checkpoint the run selected (checkpoints/best: step {BEST})" in page
    )


# --- the test split ----------------------------------------------------------------------------------------------
def test_evaluate_split_test_scores_the_test_split(guarded_run, three_split_dataset, sample_dataset, tmp_path):
    data = three_split_dataset
    out = tmp_path / "evaluation.json"
    args = ["evaluate", "--checkpoint", guarded_run, "--num-images", 8, "--metrics", "swd,memorization", "--seed", 1]
    run_hpcgan(*args, "--data", data, "--split", "test", "--out", out, check=True, timeout=120)
    report = json.loads(out.read_text())
    test, train = read_slices(data, "test"), read_slices(data, "train")
    assert report["split"] == "test" and report["real"] == {"train": len(train), "test": len(test)}
    # The baselines and the memorisation threshold are the test split's, not the validation split's.
    fake, _, _ = checkpoint_images(guarded_run / "checkpoints" / f"ckpt-{BEST:08d}.pt", 8, 1)
    on_test = evaluate(fake, train, test, metrics=("swd", "memorization"), seed=1)
    on_val = evaluate(fake, train, read_slices(data, "val"), metrics=("swd", "memorization"), seed=1)
    for metric in ("swd", "memorization"):
        assert report["metrics"][metric]["baseline"] == pytest.approx(on_test[metric]["baseline"], rel=1e-6)
    assert report["metrics"]["memorization"]["threshold"] == pytest.approx(on_test["memorization"]["threshold"])
    assert on_val["memorization"]["threshold"] != pytest.approx(on_test["memorization"]["threshold"])
    # A dataset without a test split: one line, exit 2, no file.
    refused = run_hpcgan(*args, "--data", sample_dataset, "--split", "test", "--out", tmp_path / "no.json")
    assert refused.returncode == 2 and not (tmp_path / "no.json").exists()
    assert one_line(refused).endswith(
        f"--split test: {sample_dataset} has no test split (preprocess it with --test-fraction, a split by subject "
        "that training never reads)"
    )
    # The report labels the test-split figures as the final ones.
    shutil.copy(out, tmp_path / "final.json")
    run_hpcgan("report", guarded_run, "--evaluation", tmp_path / "final.json", "--out", tmp_path / "r.html", check=True)
    assert "<b>Final figures</b>: scored on the test split" in (tmp_path / "r.html").read_text()
