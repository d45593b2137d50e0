"""Outputs derive from patients, so they are private by default (directories 0700, files 0600) whatever the
umask, and group-readable (0750, 0640) with --group-readable or HPCGAN_GROUP_READABLE=1, never
world-readable: every output-writing command, run for real under the common umask 022."""

import json
import os
import stat

import pytest

from conftest import run_hpcgan
from test_train import train_args

# 32x32, a few slices per subject: enough for every command, in seconds.
OPTIONS = "--modalities t1 --mask seg --slices 80:92 --min-brain-fraction 0 --size 32 --val-fraction 0.5".split()
TRAIN_SETS = ("model.resolution=32", "checkpoint.every_steps=2", "eval.every_steps=2", "eval.num_images=12")
TRAIN_SETS += ("log.sample_every_steps=2", "log.tensorboard=true")


@pytest.fixture
def umask_022():
    """The usual umask of a login shell: what the commands run under unless they set their own."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root, skip=()) -> dict:
    """path (relative) → permission bits of everything under `root`, but `skip`."""
    found = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if os.path.join(folder, d) not in map(str, skip)]
        for name in [*dirs, *files]:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def answers_of(session_dir, reader="R1") -> dict:
    key = json.loads(open(f"{session_dir}.key.json").read())
    answers = [{"image": image, "answer": "real", "confidence": 3} for image in sorted(key["truth"])]
    return {
        "format": "hpcgan-turing-answers",
        "version": 1,
        "session": key["session"],
        "reader": reader,
        "answers": answers,
    }


def test_every_command_writes_private_outputs_under_umask_022(sample_data, tmp_path, umask_022):
    """preprocess, train, sample, evaluate, report, turing-test make and score, sweep-summary --csv: no file
    or directory they create is readable by the group or the world. Fails where outputs follow the umask."""
    out = tmp_path / "out"
    data, run, samples = out / "dataset", out / "runs" / "run", out / "samples"
    session = out / "turing" / "session"
    run_hpcgan("preprocess", "--input", sample_data, "--output", data, *OPTIONS, check=True)
    run_hpcgan(*train_args(data, run, 4, *TRAIN_SETS), check=True)
    run_hpcgan("sample", "--checkpoint", run, "--out", samples, "--stack-size", 12, check=True)
    run_hpcgan("evaluate", "--data", data, "--samples", samples, "--out", run / "evaluation.json", check=True)
    run_hpcgan("report", run, "--samples", samples, check=True)
    run_hpcgan("turing-test", "make", "--data", data, "--samples", samples, "--out", session, "--num", 8, check=True)
    answers = tmp_path / "answers-R1.json"  # the reader's file, written by this test
    answers.write_text(json.dumps(answers_of(session)))
    run_hpcgan("turing-test", "score", session, answers, "--out", run / "turing-test.json", check=True)
    run_hpcgan("sweep-summary", run, "--metric", "swd", "--csv", out / "summary.csv", check=True)

    created = modes(out)
    for expected in (
        "dataset/manifest.json",
        "runs/run/checkpoints/latest",
        "runs/run/metrics.jsonl",
        "runs/run/tb",
        "runs/run/report.html",
        "samples/stack-00000.h5",
        "samples/stack-00000.nii.gz",
        "turing/session/index.html",
        "turing/session.key.json",
        "runs/run/turing-test.readings.csv",
        "summary.csv",
    ):
        assert expected in created, expected
    assert any(p.startswith("dataset/") and p.endswith(".h5") for p in created)
    assert any(p.startswith("runs/run/checkpoints/ckpt-") for p in created)
    exposed = {path: oct(mode) for path, mode in created.items() if mode & 0o077}
    assert not exposed, f"readable beyond the user: {exposed}"
    assert all(mode & 0o700 == 0o700 for path, mode in created.items() if os.path.isdir(out / path))


def test_group_readable_by_flag_or_environment(sample_dataset, tmp_path, umask_022):
    """--group-readable (before or after the command name) and HPCGAN_GROUP_READABLE=1 give the group read
    access (directories 0750, files 0640) and the world none; a bad value of the variable is one line, exit 2."""
    checkpoint = tmp_path / "run"
    run_hpcgan(*train_args(sample_dataset, checkpoint, 1), "--group-readable", check=True)
    run_hpcgan(
        "--group-readable", "sample", "--checkpoint", checkpoint, "--out", tmp_path / "a", "--stack-size", 4, check=True
    )
    env = {**os.environ, "HPCGAN_GROUP_READABLE": "1"}
    run_hpcgan("sample", "--checkpoint", checkpoint, "--out", tmp_path / "b", "--stack-size", 4, env=env, check=True)
    for root in ("run", "a", "b"):
        created = modes(tmp_path / root)
        assert created and all(
            mode == (0o750 if os.path.isdir(tmp_path / root / path) else 0o640) for path, mode in created.items()
        ), {path: oct(mode) for path, mode in created.items()}
    bad = run_hpcgan(
        "sample", "--checkpoint", checkpoint, "--out", tmp_path / "c", env={**env, "HPCGAN_GROUP_READABLE": "maybe"}
    )
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "hpcgan sample: error: HPCGAN_GROUP_READABLE='maybe': expected 1 or 0 (true/false)"
    ]
    assert not (tmp_path / "c").exists()
