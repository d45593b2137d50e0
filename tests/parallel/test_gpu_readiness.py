"""What a GPU run needs beyond a CPU one: train.deterministic (flags set, CPU weights unchanged, a CUDA
config torch would refuse is refused first), each rank's own CUDA RNG stream in checkpoints (old
checkpoints still load), persistent forkserver data workers that follow the epoch and leave the training's
random stream alone (a resume with workers is bit-exact), and allreduce waits timed by CUDA events read
lazily. No GPU here: torch.cuda's functions are replaced where a GPU is simulated; the tests marked
`requires_cuda` run the real thing on a GPU machine."""

import json
import os
import time

import pytest
import torch

from conftest import requires_mpirun, run_hpcgan, run_hpcgan_mpi
from hpcgan.training.state import capture_rng_state, restore_rng_state
from hpcgan.data import SliceDataset, make_loader
from hpcgan.errors import UsageError
from hpcgan.parallel.backend import Backend
from hpcgan.training.loop import set_determinism
from hpcgan.training.steps import latent_slice
from test_resume import differences, metrics_lines
from test_train import load_ckpt, train_args

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Data augmentation drawn from the dataset (flip, by epoch) and from the per-rank torch RNG (DiffAugment).
RANDOM = ["train.flip=true", "train.diffaugment=translation,cutout"]


def without_config(checkpoint: dict) -> dict:
    return {k: v for k, v in checkpoint.items() if k != "config"}


@pytest.fixture
def torch_flags():
    """Puts back the process-wide switches that set_determinism turns."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None),
    )
    yield
    torch.use_deterministic_algorithms(saved[0])
    (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
    ) = saved[1:5]
    torch.set_float32_matmul_precision(saved[5])
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    if saved[6] is not None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[6]


# --- train.deterministic ------------------------------------------------------------------------------
def test_deterministic_sets_the_flags_and_leaves_cpu_weights_as_they_were(
    sample_dataset, tmp_path, torch_flags, cli_in_process
):
    # Both in this process: the same number of CPU threads (which changes how float sums are split).
    assert cli_in_process([*map(str, train_args(sample_dataset, tmp_path / "default", 4, *RANDOM))]) == 0
    assert not torch.are_deterministic_algorithms_enabled()
    torch.backends.cudnn.allow_tf32 = True  # torch's default, which a deterministic run must turn off
    assert (
        cli_in_process(
            [*map(str, train_args(sample_dataset, tmp_path / "exact", 4, *RANDOM, "train.deterministic=true"))]
        )
        == 0
    )
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    # The CPU kernels were deterministic already: the same weights, optimizer states and RNG bit for bit.
    a, b = load_ckpt(tmp_path / "default"), load_ckpt(tmp_path / "exact")
    assert b["config"]["train"]["deterministic"] and not a["config"]["train"]["deterministic"]
    assert differences(without_config(a), without_config(b)) == []


def test_deterministic_keeps_a_users_cublas_workspace_and_refuses_bilinear_on_cuda(torch_flags):
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    set_determinism(True, torch.device("cpu"), "bilinear")  # the CPU backward of bilinear is deterministic
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8" and torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(False)
    # On CUDA torch would raise inside the first backward, after the job has started on every rank.
    with pytest.raises(UsageError, match="train.deterministic: model.resize_mode=bilinear"):
        set_determinism(True, torch.device("cuda", 0), "bilinear")
    assert not torch.are_deterministic_algorithms_enabled()


def test_without_deterministic_cudnn_benchmarks_on_cuda_only(torch_flags):
    torch.backends.cudnn.benchmark = False
    set_determinism(False, torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()
    set_determinism(False, torch.device("cuda", 0))  # fixed shapes: the algorithm search pays once
    assert torch.backends.cudnn.benchmark and not torch.are_deterministic_algorithms_enabled()


# --- each rank's own CUDA RNG ------------------------------------------------------------------------------
class FakeCudaRng:
    """torch.cuda's RNG functions on a machine with `count` GPUs, recording which device is touched."""

    def __init__(self, monkeypatch, count=2, current=1):
        self.states = {i: torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(count)}
        self.calls = []

        def refuse(*args, **kwargs):
            raise AssertionError("touched every device's RNG")

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", self.get)
        monkeypatch.setattr(torch.cuda, "set_rng_state", self.set)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", refuse)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", refuse)

    def get(self, device="cuda"):
        index = torch.device(device).index
        self.calls.append(("get", index))
        return self.states[index].clone()

    def set(self, state, device="cuda"):
        index = torch.device(device).index
        self.calls.append(("set", index))
        self.states[index] = state.clone()


def test_rng_state_holds_and_restores_only_the_ranks_own_cuda_device(monkeypatch, tmp_path):
    cuda = FakeCudaRng(monkeypatch)
    state = capture_rng_state(torch.device("cuda", 1))
    assert cuda.calls == [("get", 1)] and torch.equal(state["cuda"], cuda.states[1])
    torch.save(state, tmp_path / "rng.pt")
    state = torch.load(tmp_path / "rng.pt", weights_only=True)
    # Resumed where this rank sees its GPU as cuda:0 (one GPU per task): the stream goes there.
    restore_rng_state(state, torch.device("cuda", 0))
    assert cuda.calls[1:] == [("set", 0)] and torch.equal(cuda.states[0], torch.full((16,), 11, dtype=torch.uint8))
    # Without a device: the current one, which pick_device made the rank's own.
    assert torch.equal(capture_rng_state()["cuda"], cuda.states[1]) and cuda.calls[-1] == ("get", 1)
    # A CPU rank neither saves nor restores a CUDA stream, even where CUDA is present.
    del cuda.calls[:]
    assert capture_rng_state(torch.device("cpu"))["cuda"] is None
    restore_rng_state(state, torch.device("cpu"))
    assert cuda.calls == []


@pytest.mark.parametrize(
    "saved, device, entry",
    [
        (3, 1, 1),  # the same visibility: the entry of the rank's device
        (1, 1, 0),  # written with one GPU visible per rank: its only entry
        (2, 3, 0),  # a device beyond the old list: the first entry rather than none
    ],
)
def test_rng_state_of_older_checkpoints_with_every_device_still_restores(monkeypatch, saved, device, entry):
    cuda = FakeCudaRng(monkeypatch, count=4, current=device)
    old = {
        **capture_rng_state(torch.device("cpu")),
        "cuda": [torch.full((16,), 100 + i, dtype=torch.uint8) for i in range(saved)],
    }
    restore_rng_state(old, torch.device("cuda", device))
    assert cuda.calls == [("set", device)] and torch.equal(cuda.states[device], old["cuda"][entry])


# --- data loading and latents -----------------------------------------------------------------------------
def test_persistent_forkserver_workers_follow_the_epoch_and_leave_the_torch_rng_alone(sample_dataset):
    kwargs = dict(batch_size=4, rank=1, world_size=2, seed=3, flip=True)
    workers, sampler = make_loader(sample_dataset, "train", num_workers=2, **kwargs)
    plain, plain_sampler = make_loader(sample_dataset, "train", num_workers=0, **kwargs)
    assert workers.persistent_workers and workers.multiprocessing_context.get_start_method() == "forkserver"
    assert not workers.pin_memory and make_loader(sample_dataset, "train", pin_memory=True, **kwargs)[0].pin_memory
    reference = SliceDataset(sample_dataset, flip=True, seed=3)
    flipped_somewhere = False
    # Epochs and a resume position as the training loop sets them; the workers started in epoch 0.
    for epoch, start in ((0, 0), (1, 0), (2, 1)):
        rng = torch.get_rng_state()
        batches = {}
        for name, loader, s in (("workers", workers, sampler), ("plain", plain, plain_sampler)):
            s.set_epoch(epoch, start)
            batches[name] = [x for x, _ in loader]
        # iter(loader) takes its worker seed from the loader's own generator, not the global stream.
        assert torch.equal(torch.get_rng_state(), rng)
        assert torch.equal(torch.cat(batches["workers"]), torch.cat(batches["plain"]))
        reference.set_epoch(epoch)
        expected = torch.stack([reference[i][0] for i in sampler])
        assert torch.equal(torch.cat(batches["workers"]), expected), epoch
        flipped_somewhere |= any(reference.flips(i) != reference.flips(i, 0) for i in sampler)
    assert flipped_somewhere  # a worker stuck in epoch 0 would have shown


@pytest.mark.mpi
@requires_mpirun
def test_resume_with_data_workers_is_bit_exact(sample_dataset, tmp_path):
    # As test_resume_is_bit_exact, with flips and 2 ranks crossing an epoch, the resumed half with 2
    # persistent forkserver workers per rank against the uninterrupted run without any.
    sets = ["loss.type=wgan-gp", "checkpoint.every_steps=3", *RANDOM]
    full, split = tmp_path / "full", tmp_path / "split"
    run_hpcgan_mpi(2, *train_args(sample_dataset, full, 8, *sets), check=True, timeout=240)
    run_hpcgan_mpi(2, *train_args(sample_dataset, split, 5, *sets, "train.num_workers=2"), check=True, timeout=240)
    run_hpcgan_mpi(
        2,
        *train_args(sample_dataset, split, 8, *sets, "train.num_workers=2"),
        "--resume",
        "auto",
        check=True,
        timeout=240,
    )
    a, b = load_ckpt(full, 8), load_ckpt(split, 8)
    assert b["config"]["train"]["num_workers"] == 2 and (a["step"], a["epoch"]) == (8, 1)
    assert differences(without_config(a), without_config(b)) == []
    assert metrics_lines(split) == metrics_lines(full)


def test_latents_on_the_cpu_are_the_global_draw_sliced():
    z, labels = latent_slice(5, 7, 0, 8, 16, 2, 1, 4, torch.device("cpu"))
    z_all, labels_all = latent_slice(5, 7, 0, 8, 16, 2, 0, 8, torch.device("cpu"))
    assert torch.equal(z, z_all[4:]) and torch.equal(labels, labels_all[4:]) and z.device.type == "cpu"
    assert latent_slice(5, 7, 0, 8, 16, 0, 1, 4, torch.device("cpu"))[1] is None


# --- timing the allreduce wait -------------------------------------------------------------------------------
class SlowAllreduce(Backend):
    """One process whose gradient averaging takes `wait_s`, as a busy network would."""

    wait_s = 0.02

    def synchronize(self, optimizer):
        time.sleep(self.wait_s)


def one_optimizer():
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = torch.ones(3)
    return torch.optim.SGD([weight], lr=0.1)


def test_cpu_allreduce_wait_is_timed_by_the_host_clock():
    backend, optimizer = SlowAllreduce(device="cpu"), one_optimizer()
    assert backend.sync_seconds == 0.0
    backend.step(optimizer)
    backend.step(optimizer)
    assert 2 * SlowAllreduce.wait_s <= backend.sync_seconds < 1.0
    assert Backend(device="cpu").sync_seconds == 0.0  # per instance, not shared through the class


class FakeEvent:
    """torch.cuda.Event with a GPU clock that advances 2.5 ms per recorded event."""

    clock_ms, syncs = 0.0, []

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self, stream=None):
        FakeEvent.clock_ms += 2.5
        self.at = FakeEvent.clock_ms

    def synchronize(self):
        FakeEvent.syncs.append(self)

    def elapsed_time(self, end):
        return end.at - self.at


def test_cuda_allreduce_wait_is_read_from_events_once_per_log_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(FakeEvent, "syncs", [])
    backend, optimizer = Backend(device="cpu"), one_optimizer()
    backend.device = torch.device("cuda", 0)  # a GPU rank; the optimizer's tensors can stay on the CPU
    for _ in range(3):
        backend.step(optimizer)
    assert FakeEvent.syncs == []  # no wait for the GPU inside a step
    assert backend.sync_seconds == pytest.approx(3 * 2.5e-3)
    assert len(FakeEvent.syncs) == 1  # one, for the last event: the earlier ones have finished by then
    assert backend.sync_seconds == pytest.approx(3 * 2.5e-3) and len(FakeEvent.syncs) == 1
    backend.step(optimizer)
    assert backend.sync_seconds == pytest.approx(4 * 2.5e-3)


# --- on a GPU ------------------------------------------------------------------------------------------------
@requires_cuda
def test_cuda_deterministic_runs_agree_and_resume_bit_exact(sample_dataset, tmp_path):
    sets = [*RANDOM, "train.deterministic=true", "train.num_workers=2", "checkpoint.every_steps=3"]
    cuda = ["--device", "cuda"]
    run_hpcgan(*train_args(sample_dataset, tmp_path / "a", 8, *sets), *cuda, check=True)
    run_hpcgan(*train_args(sample_dataset, tmp_path / "b", 5, *sets), *cuda, check=True)
    run_hpcgan(*train_args(sample_dataset, tmp_path / "b", 8, *sets), *cuda, "--resume", "auto", check=True)
    a, b = load_ckpt(tmp_path / "a", 8), load_ckpt(tmp_path / "b", 8)
    assert differences(a, b) == [] and a["rng"][0]["cuda"] is not None
    assert metrics_lines(tmp_path / "a") == metrics_lines(tmp_path / "b")
    # Timed by CUDA events, resolved at each log line.
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    waits = [line["allreduce_wait"] for line in lines if "loss_d" in line]
    assert len(waits) == 8 and all(0 <= w <= 1 for w in waits)  # fractions of the wall time
