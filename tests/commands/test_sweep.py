"""`hpcgan sweep` (grid point → --set overrides, names, counts) and `hpcgan sweep-summary`."""

import csv
import itertools
import json

import pytest
import yaml

from hpcgan.cli import main
from hpcgan.commands.sweep import grid_point, grid_size, parse_grid, run_name
from conftest import run_hpcgan

GRID = "lr=1e-4,2e-4,1e-3 beta1=0.5,0.9 beta2=0.9,0.99,0.999 latent=50,100,500,1000"


def hpcgan(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_sweep_prints_the_overrides_of_a_grid_point(capsys):
    assert hpcgan(capsys, "sweep", "--grid", GRID, "--count")[:2] == (0, "72")
    assert hpcgan(capsys, "sweep", "--grid", GRID, "--index", 0)[:2] == (
        0,
        "--set optim.lr=0.0001 --set optim.beta1=0.5 --set optim.beta2=0.9 --set model.latent_dim=50",
    )
    assert hpcgan(capsys, "sweep", "--grid", GRID, "--index", 71)[1] == (
        "--set optim.lr=0.001 --set optim.beta1=0.9 --set optim.beta2=0.999 --set model.latent_dim=1000"
    )
    assert hpcgan(capsys, "sweep", "--grid", GRID, "--index", 5, "--name")[1] == "lr1e-4_beta10.5_beta20.99_latent100"
    assert hpcgan(capsys, "sweep", "--grid", "loss=hinge,wgan-gp train.steps=10", "--index", 1)[1] == (
        "--set loss.type=wgan-gp --set train.steps=10"
    )


def test_every_point_is_one_element_of_the_product_in_row_major_order():
    axes = parse_grid(GRID)
    points = [tuple(v for _, v in grid_point(axes, i)) for i in range(grid_size(axes))]
    assert points == list(itertools.product(*(values for _, values in axes)))
    assert len({run_name(grid_point(axes, i)) for i in range(72)}) == 72


def test_printed_overrides_load_into_the_training_config(capsys):
    from hpcgan.config import load_config
    from hpcgan.training.config import Config

    sets = hpcgan(capsys, "sweep", "--grid", GRID, "--index", 40)[1].split()[1::2]
    cfg = load_config(Config, None, sets)
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.optim.beta2, cfg.model.latent_dim) == (2e-4, 0.9, 0.99, 50)


def test_index_defaults_to_the_slurm_array_task(capsys, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert hpcgan(capsys, "sweep", "--grid", GRID, "--name")[1] == "lr1e-4_beta10.5_beta20.9_latent1000"


@pytest.mark.parametrize(
    "grid, index, message",
    [
        (GRID, 72, "--index 72: out of range for a grid of 72 points (0 to 71)"),
        (GRID, -1, "--index -1: out of range"),
        ("lr=", 0, "--grid: 'lr=' is not KEY=V1,V2,..."),
        ("lr=1e-4,,2e-4", 0, "is not KEY=V1,V2,..."),
        ("learning_rate=1", 0, "--grid: unknown short key 'learning_rate'"),
        ("lr=1 lr=2", 0, "--grid: key 'lr' appears twice"),
        ("lr=fast", 0, "--grid: 'optim.lr' must be a number"),
        ("optim.nope=1", 0, "--grid: unknown key 'optim.nope'"),
    ],
)
def test_bad_grid_or_index_is_exit_2_with_one_line(capsys, grid, index, message):
    code, out, err = hpcgan(capsys, "sweep", "--grid", grid, "--index", index)
    assert code == 2 and out == "" and len(err.splitlines()) == 1 and message in err


def test_sweep_from_the_shell(tmp_path):
    result = run_hpcgan("sweep", "--grid", GRID, "--index", 1, timeout=60, check=True)
    assert result.stdout.strip().endswith("--set model.latent_dim=100")
    assert run_hpcgan("sweep", "--grid", GRID, "--index", 99, timeout=60).returncode == 2


# --- sweep-summary ------------------------------------------------------------------------------


def make_run(root, name, lr, evals=(), evaluation=None, torn_line=False):
    run = root / name
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"optim": {"lr": lr, "beta1": 0.5}, "train": {"steps": 20}}))
    lines = [json.dumps({"step": 10, "epoch": 0, "loss_d": 1.0, "loss_g": 2.0})]
    lines += [json.dumps({"step": step, "eval": {"swd": {"value": v, "baseline": 1.0}}}) for step, v in evals]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + ('{"step": 30, "eval": {"sw' if torn_line else ""))
    if evaluation is not None:
        (run / "evaluation.json").write_text(json.dumps({"metrics": {"swd": {"value": evaluation}}}))
    return run


def test_summary_ranks_runs_by_the_last_evaluation(capsys, tmp_path):
    runs = [
        make_run(tmp_path, "a", 1e-4, evals=[(10, 0.2), (20, 0.9)], torn_line=True),  # last eval counts
        make_run(tmp_path, "b", 2e-4, evaluation=0.5),  # no eval during training: evaluation.json
        make_run(tmp_path, "c", 1e-3),  # nothing: last, "no result"
        make_run(tmp_path, "d", 5e-4, evals=[(20, 0.1)], evaluation=7.0),
    ]  # evaluation.json, the final score, wins over metrics.jsonl
    (runs[2] / "config.yaml").unlink()  # a run without its config adds no columns
    out_csv = tmp_path / "summary.csv"
    code, out, _ = hpcgan(capsys, "sweep-summary", *runs, "--metric", "swd", "--csv", out_csv)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["rank", "run", "swd", "step", "split", "optim.lr"]  # only the swept key
    assert [line.split()[:3] for line in lines[1:]] == [
        ["1", "b", "0.5"],
        ["2", "a", "0.9"],
        ["3", "d", "7"],
        ["-", "c", "no"],
    ]
    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["swd"], r["split"], r["optim.lr"]) for r in rows] == [
        ("b", "0.5", "val", "0.0002"),
        ("a", "0.9", "val", "0.0001"),
        ("d", "7", "val", "0.0005"),
        ("c", "no result", "-", ""),
    ]
    assert rows[1]["step"] == "20" and rows[0]["step"] == rows[2]["step"] == "evaluation.json"


GUARD = {"eval": {"every_steps": 1}, "checkpoint": {"best_metric": "swd", "max_memorization": 0.2}}


def guarded_run(root, name, memorization: list, dice: float | None = None, scored: str = "best", split="test"):
    """A run trained with the memorisation guard: checkpoints of steps 1, 2, ... written by the real writer with
    swd falling and the given memorisation, and an evaluation.json with the segmentation task's Dice of the
    `scored` checkpoint (best or latest)."""
    import torch

    from hpcgan.training.checkpointing import CheckpointWriter, read_index, read_pointer

    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**GUARD, "optim": {"lr": len(memorization) * 1e-4}}))
    writer = CheckpointWriter(run / "checkpoints", keep_last=1, best_metric="swd", max_memorization=0.2)
    for step, mem in enumerate(memorization, 1):
        writer.submit({"x": torch.zeros(2)}, step, metrics={"swd": 10.0 / step, "memorization": mem})
    writer.close()
    entries = {e["file"]: e for e in read_index(run / "checkpoints")}
    pointer = read_pointer(run / "checkpoints" / scored)
    if dice is not None and pointer:
        evaluation = {
            "metrics": {"segmentation": {"value": dice, "baseline": 0.5, "higher_is_better": True}},
            "generated": {"source": "checkpoint", "checkpoint_sha256": entries[pointer]["sha256"]},
            "split": split,
        }
        (run / "evaluation.json").write_text(json.dumps(evaluation))
    return run


def test_summary_ranks_guarded_runs_by_the_dice_of_their_selected_checkpoint(capsys, tmp_path):
    runs = [
        guarded_run(tmp_path, "passed", [0.0, 0.1, 0.5], dice=0.7),  # best: step 2 (step 3 memorised)
        guarded_run(tmp_path, "other-ckpt", [0.0, 0.1, 0.5], dice=0.9, scored="latest"),  # Dice of step 3: not it
        guarded_run(tmp_path, "none-passed", [0.5, 0.6], dice=0.95, scored="latest"),
        make_run(tmp_path, "unguarded", 1e-3, evaluation=0.5),  # no evaluation during training
    ]
    (runs[3] / "evaluation.json").write_text(json.dumps({"metrics": {"segmentation": {"value": 0.6}}}))
    code, out, _ = hpcgan(capsys, "sweep-summary", *runs, "--metric", "segmentation")
    assert code == 0
    lines = [line.split() for line in out.splitlines()]
    assert lines[0][:7] == ["rank", "run", "segmentation", "step", "memorization", "guard", "split"]
    assert lines[1][:9] == ["1", "passed", "0.7", "evaluation.json", "-", "<=", "0.2", "passed", "at"]
    assert lines[1][9:11] == ["step", "2"] and lines[1][11] == "test"  # the final figure, on the test split
    assert lines[2][:3] == ["2", "unguarded", "0.6"] and lines[2][5:7] == ["off", "val"]
    assert lines[3][:4] == ["-", "other-ckpt", "no", "result"] and lines[3][5:10] == [
        "<=",
        "0.2",
        "passed",
        "at",
        "step",
    ]
    assert lines[4][:4] == ["-", "none-passed", "no", "result"] and "(none passed)" in out.splitlines()[4]


def test_summary_refuses_unknown_metric_and_missing_runs(capsys, tmp_path):
    run = make_run(tmp_path, "a", 1e-4)
    code, _, err = hpcgan(capsys, "sweep-summary", run, "--metric", "ssim")
    assert code == 2 and "--metric: unknown metric 'ssim' (known: swd," in err
    code, _, err = hpcgan(capsys, "sweep-summary", tmp_path / "nope")
    assert code == 2 and "no such run directory" in err
