"""Checkpoint format, background writer, rotation, validation and loading (hpcgan.training.checkpointing)."""

import datetime
import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO
from hpcgan.training.checkpointing import (
    CHECKPOINT_FORMAT,
    CheckpointWriter,
    find_latest_valid,
    load_checkpoint,
    resolve_checkpoint,
    to_host,
)
from hpcgan.errors import HpcganError, UsageError
from hpcgan.training.state import capture_rng_state, restore_rng_state
from hpcgan.io import sha256_file


def small_state(step=0):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    return {
        "step": step,
        "config": {"model": {"arch": "x"}},
        "G": model.state_dict(),
        "opt_G": opt.state_dict(),
        "rng": [capture_rng_state()],
        "scaler": None,
    }


def draws():
    return (
        torch.rand(5).tolist(),
        np.random.rand(5).tolist(),
        np.random.randn(3).tolist(),
        [random.random() for _ in range(5)],
        random.gauss(0, 1),
    )


def test_rng_capture_restore_is_exact_and_survives_weights_only_save(tmp_path):
    draws()
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = capture_rng_state()
    first = draws()
    restore_rng_state(state)
    assert draws() == first
    torch.save({"rng": state}, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]
    restore_rng_state(loaded)
    assert draws() == first


def test_to_host_copies_deeply_and_refuses_what_weights_only_cannot_load():
    t = torch.arange(4.0, requires_grad=True)
    state = {"a": {"b": [t, 3, "s", None, (0.9, 0.99)]}, "fid": np.float64(2.5)}
    host = to_host(state)
    with torch.no_grad():
        t.add_(100)
    assert host["a"]["b"][0].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert not host["a"]["b"][0].requires_grad
    assert host["a"]["b"][1:] == [3, "s", None, (0.9, 0.99)]
    assert type(host["fid"]) is float
    with pytest.raises(HpcganError, match=r"'state\.G\.w': ndarray"):
        to_host({"G": {"w": np.zeros(3)}})


def test_written_checkpoint_is_atomic_indexed_and_weights_only_loadable(tmp_path):
    writer = CheckpointWriter(tmp_path / "checkpoints")
    state = small_state(step=7)
    writer.submit(state, 7, metrics={"fid": np.float32(1.5)})
    writer.close()
    d = tmp_path / "checkpoints"
    assert sorted(p.name for p in d.iterdir()) == ["checkpoints.json", "ckpt-00000007.pt", "latest"]
    index = json.loads((d / "checkpoints.json").read_text())
    assert index == [
        {"file": "ckpt-00000007.pt", "step": 7, "sha256": sha256_file(d / "ckpt-00000007.pt"), "metrics": {"fid": 1.5}}
    ]
    assert (d / "latest").read_text().strip() == "ckpt-00000007.pt"
    raw = torch.load(d / "ckpt-00000007.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == CHECKPOINT_FORMAT and raw["format_version"] == 1 and raw["step"] == 7
    assert raw["metrics"] == {"fid": 1.5}
    assert torch.equal(raw["G"]["weight"], state["G"]["weight"])
    assert raw["opt_G"]["state"][0]["exp_avg"].shape == (3, 4)
    # the three accepted forms of a path give the same checkpoint
    for form in (d / "ckpt-00000007.pt", d, tmp_path):
        assert resolve_checkpoint(form) == d / "ckpt-00000007.pt"
    assert load_checkpoint(tmp_path)["step"] == 7


@pytest.mark.parametrize("mode, values, best_step", [("min", [5, 1, 4, 3, 6], 2), ("max", [1, 9, 4, 3, 2], 2)])
def test_rotation_keeps_last_k_and_the_best(tmp_path, mode, values, best_step):
    d = tmp_path / "ck"
    writer = CheckpointWriter(d, keep_last=2, best_metric="fid", best_mode=mode)
    for step, value in enumerate(values, start=1):
        writer.submit(small_state(step), step, metrics={"fid": value})
    writer.flush()
    assert sorted(p.name for p in d.glob("ckpt-*.pt")) == [f"ckpt-{s:08d}.pt" for s in sorted({best_step, 4, 5})]
    assert [e["step"] for e in json.loads((d / "checkpoints.json").read_text())] == sorted({best_step, 4, 5})
    assert (d / "best").read_text().strip() == f"ckpt-{best_step:08d}.pt"
    assert (d / "latest").read_text().strip() == "ckpt-00000005.pt"
    assert not list(d.glob(".*"))  # no temp files left
    # a resumed run continues the same index and rotation
    writer = CheckpointWriter(d, keep_last=2, best_metric="fid", best_mode=mode)
    writer.submit(small_state(6), 6, metrics={"fid": 100 if mode == "min" else -100})
    writer.close()
    assert sorted(p.name for p in d.glob("ckpt-*.pt")) == [f"ckpt-{s:08d}.pt" for s in sorted({best_step, 5, 6})]


def test_find_latest_valid_skips_truncated_and_corrupt_newest(tmp_path, warnings_of_hpcgan):
    d = tmp_path / "checkpoints"
    writer = CheckpointWriter(d, keep_last=5)
    for step in (10, 20, 30):
        writer.submit(small_state(step), step)
    writer.close()
    newest, middle = d / "ckpt-00000030.pt", d / "ckpt-00000020.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated
    data = bytearray(middle.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    middle.write_bytes(bytes(data))
    assert find_latest_valid(d) == d / "ckpt-00000010.pt"
    text = warnings_of_hpcgan.text
    assert "ckpt-00000030.pt" in text and "ckpt-00000020.pt" in text
    assert load_checkpoint(tmp_path)["step"] == 10
    # without an index the files are tried newest first; only the checksum finds a flipped data byte
    (d / "checkpoints.json").unlink()
    assert find_latest_valid(d) == middle
    with pytest.raises(UsageError, match="truncated or corrupt checkpoint"):
        load_checkpoint(newest)


def test_load_checkpoint_refuses_bad_files_with_one_line(tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.pt", "no such checkpoint file or directory")
    text = tmp_path / "notes.pt"
    text.write_text("hello\n")
    cases["text"] = (text, "truncated or corrupt checkpoint")
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.ones(2)}, plain)
    cases["plain tensors"] = (plain, "not an hpcgan checkpoint")
    objects = tmp_path / "objects.pt"
    torch.save({"when": datetime.date(2026, 1, 1)}, objects)
    cases["python objects"] = (objects, "not an hpcgan checkpoint")
    future = tmp_path / "future.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "format_version": 99}, future)
    cases["future"] = (future, "format_version 99 is not supported")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases["empty dir"] = (empty, "neither a checkpoint nor a directory of checkpoints")
    for name, (path, message) in cases.items():
        with pytest.raises(UsageError) as info:
            load_checkpoint(path)
        assert str(info.value).startswith(str(path)) and message in str(info.value), name
        assert "\n" not in str(info.value)


def test_write_error_surfaces_at_flush_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    d = tmp_path / "checkpoints"
    writer = CheckpointWriter(d)

    def failing_save(obj, f):  # a disk that fills up half-way through the file
        f.write(b"PK\x03\x04partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    writer.submit(small_state(1), 1)
    with pytest.raises(HpcganError, match=r"ckpt-00000001\.pt: no space left on device; the earlier checkpoints"):
        writer.flush()
    writer.flush()  # raised once, then cleared
    assert list(d.iterdir()) == []  # no checkpoint, no temp file, no index
    monkeypatch.undo()
    # an error is also raised by the next submit
    writer.submit(small_state(2), 2)
    writer.flush()
    shutil.rmtree(d)
    writer.submit(small_state(3), 3)
    with pytest.raises(HpcganError, match="ckpt-00000003.pt: writing the checkpoint failed"):
        writer.submit(small_state(4), 4)


def test_submit_does_not_wait_for_the_write(tmp_path):
    # 192 MiB of float32: the copy to host takes ~0.1 s, torch.save + fsync + sha256 several times that.
    big = {"G": {f"w{i}": torch.randn(1024, 1024) for i in range(48)}}
    expected = big["G"]["w0"].clone()
    writer = CheckpointWriter(tmp_path)
    t0 = time.perf_counter()
    writer.submit(big, 1)
    stall = time.perf_counter() - t0
    # submit returned while the file is still being written (timing ratios flake on a busy machine)
    still_writing = writer._thread.is_alive() and not (tmp_path / "ckpt-00000001.pt").exists()
    big["G"]["w0"].zero_()  # the training loop goes on changing its tensors
    writer.flush()
    total = time.perf_counter() - t0
    assert still_writing, f"submit returned after {stall:.2f}s with the write done ({total:.2f}s in all)"
    assert torch.equal(load_checkpoint(tmp_path / "ckpt-00000001.pt")["G"]["w0"], expected)
    # the next checkpoint reuses the host buffers of the written one: right values in both files
    writer.submit(big, 2)
    big["G"]["w0"].fill_(7.0)
    writer.close()
    assert torch.equal(load_checkpoint(tmp_path / "ckpt-00000001.pt")["G"]["w0"], expected)
    second = load_checkpoint(tmp_path / "ckpt-00000002.pt")["G"]
    assert not second["w0"].any() and torch.equal(second["w1"], big["G"]["w1"])


def test_resuming_from_an_older_checkpoint_drops_the_abandoned_newer_ones(tmp_path):
    d = tmp_path / "checkpoints"
    writer = CheckpointWriter(d, keep_last=5, best_metric="fid")
    for step, fid in ((10, 3.0), (20, 1.0), (30, 2.0)):
        writer.submit(small_state(step), step, metrics={"fid": fid})
    writer.close()
    # the run resumes from step 10 (say 20 and 30 were refused) and checkpoints at step 15
    writer = CheckpointWriter(d, keep_last=5, best_metric="fid")
    writer.submit(small_state(15), 15, metrics={"fid": 5.0})
    writer.close()
    assert sorted(p.name for p in d.glob("ckpt-*.pt")) == ["ckpt-00000010.pt", "ckpt-00000015.pt"]
    assert (d / "latest").read_text().strip() == "ckpt-00000015.pt"
    assert (d / "best").read_text().strip() == "ckpt-00000010.pt"
    assert find_latest_valid(d) == d / "ckpt-00000015.pt"


def test_a_new_writer_removes_what_a_killed_write_left(tmp_path):
    d = tmp_path / "checkpoints"
    writer = CheckpointWriter(d, keep_last=5)
    for step in (1, 2):
        writer.submit(small_state(step), step)
    writer.close()
    # A process killed inside atomic_path leaves its temp file: the real name, from a real SIGKILL.
    killed = (
        "import os, signal, sys\nfrom hpcgan.io import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    open(tmp, 'wb').write(b'PK' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", killed, str(d / "ckpt-00000003.pt")], cwd=REPO)
    assert result.returncode == -signal.SIGKILL
    temps = [p.name for p in d.iterdir() if p.name.startswith(".ckpt-00000003.pt.")]
    assert len(temps) == 1
    # A kill between the rename and the index update leaves a checkpoint that no index lists.
    shutil.copy(d / "ckpt-00000002.pt", d / "ckpt-00000004.pt")
    assert find_latest_valid(d) == d / "ckpt-00000002.pt"  # the index decides
    CheckpointWriter(d, keep_last=5)
    assert sorted(p.name for p in d.iterdir()) == ["checkpoints.json", "ckpt-00000001.pt", "ckpt-00000002.pt", "latest"]
    # Without a readable index no checkpoint file is known to be garbage: all stay.
    (d / "checkpoints.json").write_text("{torn")
    CheckpointWriter(d, keep_last=5)
    assert sorted(p.name for p in d.glob("ckpt-*.pt")) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]


def test_grad_scaler_state_survives_a_checkpoint(tmp_path):
    """The fp16 loss scalers (scale, growth tracker) come back exactly, so a resumed run skips and
    grows on the same steps. (fp16 training needs CUDA; the scaler's bookkeeping is the same on the CPU.)"""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.Adam(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)

    def step(scaler, loss_factor=1.0):
        opt.zero_grad()
        scaler.scale(model(torch.ones(2, 4)).sum() * loss_factor).backward()
        scaler.step(opt)
        scaler.update()

    for factor in (1.0, float("inf"), 1.0, 1.0):  # one overflow halves the scale, then growth counts
        step(scaler, factor)
    writer = CheckpointWriter(tmp_path)
    writer.submit({"scaler_G": scaler.state_dict()}, 4)
    writer.close()
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(load_checkpoint(tmp_path)["scaler_G"])
    assert restored.state_dict() == scaler.state_dict() and scaler.get_scale() == 2.0**7
    step(scaler)
    step(restored)
    assert restored.state_dict() == scaler.state_dict() and scaler.get_scale() == 2.0**8  # grew on the same step
