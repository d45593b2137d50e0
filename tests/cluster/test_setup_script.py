"""The Horovod-build decisions of scripts/setup.sh (scripts/horovod-build.sh), run in real bash: the wheel cache
key and the "up to date" stamp follow the torch build (CPU or CUDA), NCCL and nvcc are found or the set-up stops
with a one-line message, and a `horovodrun --check-build` without [X] NCCL is refused when torch has CUDA.
No GPU here: CUDA is given as the version torch would report, NCCL as a fake nvidia-nccl wheel layout, nvcc as a
stub script; the check-build texts are recorded under tests/data/horovod-check-build/ (cpu-mpi-gloo.txt from this
machine's build, the CUDA ones printed by Horovod 0.28.1's own check_build with nccl_built forced)."""

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

HELPERS = REPO / "scripts" / "horovod-build.sh"
CHECK_BUILD = REPO / "tests" / "data" / "horovod-check-build"
VPY = sys.executable
MPI = "mpirun-Open-MPI-4.1.4"
# What the user's environment could set and the tests must not see (each test sets its own).
SITE_VARS = (
    "HOROVOD_NCCL_HOME",
    "HOROVOD_NCCL_INCLUDE",
    "HOROVOD_NCCL_LIB",
    "HOROVOD_NCCL_LINK",
    "NCCL_HOME",
    "NCCL_ROOT",
    "HOROVOD_CUDA_HOME",
    "CUDA_HOME",
    "CUDA_PATH",
    "PYTHONPATH",
)


def bash(script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `script` in bash after sourcing scripts/horovod-build.sh, with args as $1...; errexit on, like setup.sh."""
    base = {k: v for k, v in os.environ.items() if k not in SITE_VARS}
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; source "{HELPERS}"; {script}', "bash", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(script: str, *args: str, env: dict | None = None) -> str:
    proc = bash(script, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The message of a set-up that stopped: exit 1 and a single `setup: error:` line on stderr."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("setup: error: "), proc.stderr
    return lines[0]


def fake_nccl_wheel(root: Path, version=(2, 21, 5)) -> Path:
    """The layout of pip's nvidia-nccl-cu12 (only the versioned libnccl.so.2), as a namespace package under root."""
    nccl = root / "nvidia" / "nccl"
    (nccl / "lib").mkdir(parents=True)
    (nccl / "include").mkdir()
    (nccl / "lib" / "libnccl.so.2").write_bytes(b"\x7fELF fake")
    major, minor, patch = version
    defines = f"#define NCCL_MAJOR {major}\n#define NCCL_MINOR {minor}\n#define NCCL_PATCH {patch}\n"
    (nccl / "include" / "nccl.h").write_text(f"#ifndef NCCL_H_\n{defines}#endif\n")
    return nccl


def test_cpu_cache_key_is_the_one_of_the_wheels_already_cached():
    # The name of ~/.cache/hpcgan/wheels/<key> before NCCL was part of the key: a CPU build must find it again.
    key = ok('horovod_cache_key "$@"', "0.28.1", "2.13.0", "cpu", MPI, "py311", "").strip()
    assert key == f"horovod-0.28.1-torch2.13.0-cpu-{MPI}-py311"
    assert ok('horovod_cache_key "$@"', "0.28.1", "2.13.0", "cpu", MPI, "py311").strip() == key


def test_cuda_torch_gets_its_own_cache_key_with_the_nccl_version():
    cpu = ok('horovod_cache_key "$@"', "0.28.1", "2.5.1", "cpu", MPI, "py311", "").strip()
    cuda = ok('horovod_cache_key "$@"', "0.28.1", "2.5.1", "12.4", MPI, "py311", "2.21.5").strip()
    other_nccl = ok('horovod_cache_key "$@"', "0.28.1", "2.5.1", "12.4", MPI, "py311", "2.26.2").strip()
    assert cuda == f"horovod-0.28.1-torch2.5.1-12.4-nccl2.21.5-{MPI}-py311"
    assert len({cpu, cuda, other_nccl}) == 3


def test_the_stamp_changes_when_torch_switches_between_cpu_and_cuda():
    cpu = ok('setup_stamp "$@"', str(REPO), MPI, "2.5.1", "cpu").strip()
    cuda = ok('setup_stamp "$@"', str(REPO), MPI, "2.5.1", "12.4").strip()
    assert cpu != cuda and cpu.endswith("-torch2.5.1-cpu") and cuda.endswith("-torch2.5.1-12.4")
    assert cpu == ok('setup_stamp "$@"', str(REPO), MPI, "2.5.1", "cpu").strip()  # same build, same stamp


def test_torch_build_reads_this_venvs_cpu_torch():
    import torch

    version, cuda, py_tag = ok('torch_build "$1"', VPY).split()
    assert (version, cuda) == (torch.__version__.split("+")[0], torch.version.cuda or "cpu")
    assert py_tag == f"py{sys.version_info[0]}{sys.version_info[1]}"


def test_nccl_from_a_pip_wheel_is_linked_shared_through_an_unversioned_symlink(tmp_path):
    nccl = fake_nccl_wheel(tmp_path / "site")
    out = ok(
        'find_nccl "$1" 12.4; nccl_version "$NCCL_INCLUDE_DIR/nccl.h"; horovod_nccl_env "$2"; '
        'echo "$NCCL_LIB"; echo "$HOROVOD_NCCL_HOME $HOROVOD_NCCL_INCLUDE $HOROVOD_NCCL_LIB $HOROVOD_NCCL_LINK"',
        VPY,
        str(tmp_path / "link"),
        env={"PYTHONPATH": str(tmp_path / "site")},
    )
    version, lib, exported = out.splitlines()
    assert version == "2.21.5"
    assert Path(lib).resolve() == (nccl / "lib" / "libnccl.so.2").resolve()
    home, include, libdir, link = exported.split()
    assert (home, include, libdir, link) == (
        str(tmp_path / "link"),
        f"{tmp_path}/link/include",
        f"{tmp_path}/link/lib",
        "SHARED",
    )
    unversioned = Path(libdir) / "libnccl.so"  # what FindNCCL.cmake's find_library(NAMES nccl) looks for
    assert unversioned.is_symlink() and unversioned.resolve() == (nccl / "lib" / "libnccl.so.2").resolve()
    assert (Path(include) / "nccl.h").read_text().startswith("#ifndef NCCL_H_")


def test_the_users_horovod_nccl_home_comes_first(tmp_path):
    fake_nccl_wheel(tmp_path / "site")  # would be found otherwise
    home = tmp_path / "nccl-module"
    (home / "lib").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "lib" / "libnccl.so").write_bytes(b"fake")
    (home / "include" / "nccl.h").write_text("#define NCCL_MAJOR 2\n#define NCCL_MINOR 18\n#define NCCL_PATCH 1\n")
    out = ok(
        'find_nccl "$1" 12.1; horovod_nccl_env "$2"; echo "$HOROVOD_NCCL_LIB $HOROVOD_NCCL_LINK"',
        VPY,
        str(tmp_path / "link"),
        env={"PYTHONPATH": str(tmp_path / "site"), "HOROVOD_NCCL_HOME": str(home)},
    )
    assert out.split() == [str(home / "lib"), "SHARED"]  # an unversioned library: no symlink needed
    assert not (tmp_path / "link").exists()


def test_a_horovod_nccl_home_without_nccl_stops_with_one_line(tmp_path):
    message = one_line_error(bash('find_nccl "$1" 12.4', VPY, env={"HOROVOD_NCCL_HOME": str(tmp_path)}))
    assert f"HOROVOD_NCCL_HOME={tmp_path} has no include/nccl.h" in message


def test_cuda_torch_without_nccl_stops_naming_the_fixes():
    if (
        glob.glob("/usr/lib/*-linux-gnu/libnccl*")
        or "libnccl"
        in subprocess.run(["bash", "-c", "ldconfig -p 2>/dev/null || true"], capture_output=True, text=True).stdout
    ):
        pytest.skip("this machine has a system NCCL, which find_nccl rightly finds")
    message = one_line_error(bash('find_nccl "$1" 12.4', VPY))
    assert "torch has CUDA 12.4 but no NCCL was found" in message
    assert f"'{VPY} -m pip install nvidia-nccl-cu12'" in message
    assert "module load nccl" in message and "HOROVOD_NCCL_HOME" in message


def test_nvcc_is_found_through_cuda_home(tmp_path):
    nvcc = tmp_path / "cuda-12.4" / "bin" / "nvcc"  # a stub: answers --version like nvcc 12.4
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    proc = bash(
        'find_nvcc 12.4 "$1"; echo "$HOROVOD_CUDA_HOME"',
        str(tmp_path / "none"),
        env={"CUDA_HOME": str(tmp_path / "cuda-12.4")},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == str(tmp_path / "cuda-12.4")
    assert "warning" not in proc.stdout  # same major version as torch's CUDA


def test_no_nvcc_stops_with_one_line(tmp_path):
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep) if not Path(d, "nvcc").exists())
    message = one_line_error(bash('find_nvcc 12.4 "$1"', str(tmp_path / "no-cuda"), env={"PATH": path}))
    assert message == "setup: error: torch has CUDA 12.4 but no nvcc found: module load cuda/12.4 or set CUDA_HOME"


@pytest.mark.parametrize("recording, cuda", [("cpu-mpi-gloo.txt", "cpu"), ("cuda-nccl-mpi-gloo.txt", "12.4")])
def test_a_complete_check_build_passes(recording, cuda):
    ok('check_horovod_build "$1" "$2"', (CHECK_BUILD / recording).read_text(), cuda)


@pytest.mark.parametrize("recording", ["cuda-without-nccl.txt", "cpu-mpi-gloo.txt"])
def test_cuda_torch_with_a_horovod_without_nccl_stops_and_drops_the_cached_wheel(tmp_path, recording):
    wheel_dir = tmp_path / "wheels" / "horovod-0.28.1-torch2.5.1-12.4-nccl2.21.5-mpi-py311"
    wheel_dir.mkdir(parents=True)
    (wheel_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_bytes(b"PK")
    text = (CHECK_BUILD / recording).read_text()
    message = one_line_error(bash('check_horovod_build "$@"', text, "12.4", str(wheel_dir)))
    assert "torch has CUDA 12.4 but Horovod was built without NCCL (its cached wheel is removed)" in message
    assert not wheel_dir.exists()


def test_a_check_build_without_pytorch_or_mpi_stops(tmp_path):
    text = (CHECK_BUILD / "cuda-nccl-mpi-gloo.txt").read_text()
    no_torch = one_line_error(bash('check_horovod_build "$1" 12.4', text.replace("[X] PyTorch", "[ ] PyTorch")))
    assert "PyTorch extension is missing or does not load" in no_torch
    no_mpi = one_line_error(bash('check_horovod_build "$1" cpu', text.replace("[X] MPI", "[ ] MPI")))
    assert "without its MPI controller" in no_mpi


def test_this_machines_horovod_passes_the_check():
    horovodrun = Path(VPY).parent / "horovodrun"
    if not horovodrun.exists():
        pytest.skip("Horovod is not installed (scripts/setup.sh builds it)")
    text = subprocess.run(
        [str(horovodrun), "--check-build"], capture_output=True, text=True, timeout=120, check=True
    ).stdout
    cuda = ok('torch_build "$1"', VPY).split()[1]
    ok('check_horovod_build "$1" "$2"', text, cuda)
    if cuda == "cpu":  # the recording is this kind of machine's output, byte for byte
        assert text == (CHECK_BUILD / "cpu-mpi-gloo.txt").read_text()


# The cached Horovod wheel (~/.cache/hpcgan/wheels/<key>/): building one takes minutes, so what is tested
# here is the cache's own validation, on deliberately damaged entries; `make test-fresh` builds it from empty.
WHEEL_NAME = "horovod-0.28.1-cp311-cp311-linux_x86_64.whl"
WHEEL_MEMBERS = ("horovod/__init__.py", "horovod/torch/mpi_lib_v2.cpython-311-x86_64-linux-gnu.so")


def wheel_shaped_zip(path: Path, members=WHEEL_MEMBERS) -> Path:
    """A zip with a Horovod wheel's name and key members, stored uncompressed (so bytes can be damaged in place)."""
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as wheel:
        for name in members:
            wheel.writestr(name, f"contents of {name} ".encode() * 200)
    return path


def cached_wheel_check(wheel_dir: Path, name="horovod", extension="horovod/torch/mpi_lib_v2"):
    return bash('cached_wheel_ok "$@"', VPY, str(wheel_dir), name, extension)


def test_a_whole_cached_wheel_is_kept(tmp_path):
    wheel = wheel_shaped_zip(tmp_path / "key" / WHEEL_NAME)
    proc = cached_wheel_check(wheel.parent)
    assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr
    assert wheel.is_file()


def test_a_missing_cached_wheel_is_built_without_a_word(tmp_path):
    proc = cached_wheel_check(tmp_path / "key")
    assert proc.returncode == 1 and proc.stdout == "" and proc.stderr == ""


def damage_truncated(wheel_dir: Path):
    wheel = wheel_shaped_zip(wheel_dir / WHEEL_NAME)
    wheel.write_bytes(wheel.read_bytes()[: wheel.stat().st_size // 2])  # an interrupted copy


def damage_checksum(wheel_dir: Path):
    wheel = wheel_shaped_zip(wheel_dir / WHEEL_NAME)
    data = bytearray(wheel.read_bytes())
    at = data.index(b"contents of horovod/torch") + 10
    data[at : at + 4] = b"XXXX"  # same length: the zip still opens, the member fails its CRC
    wheel.write_bytes(bytes(data))


def damage_directory(wheel_dir: Path):
    (wheel_dir / WHEEL_NAME / "horovod").mkdir(parents=True)  # the mmdebstrap bug's shape: a folder with the name


def damage_empty(wheel_dir: Path):
    wheel_dir.mkdir(parents=True)


def damage_no_extension(wheel_dir: Path):
    wheel_shaped_zip(wheel_dir / WHEEL_NAME, members=WHEEL_MEMBERS[:1])  # built without its PyTorch part


def damage_two_wheels(wheel_dir: Path):
    wheel_shaped_zip(wheel_dir / WHEEL_NAME)
    wheel_shaped_zip(wheel_dir / WHEEL_NAME.replace("0.28.1", "0.28.0"))


@pytest.mark.parametrize(
    "damage, reason",
    [
        (damage_truncated, "is not a readable wheel"),
        (damage_checksum, "mpi_lib_v2.cpython-311-x86_64-linux-gnu.so in"),
        (damage_directory, "is not a regular file"),
        (damage_empty, "0 horovod-*.whl files where one belongs"),
        (damage_no_extension, "has no horovod/torch/mpi_lib_v2*.so"),
        (damage_two_wheels, "2 horovod-*.whl files where one belongs"),
    ],
    ids=["truncated", "checksum", "directory", "empty", "no-extension", "two-wheels"],
)
def test_a_damaged_cached_wheel_is_removed_with_one_line_saying_why(tmp_path, damage, reason):
    wheel_dir = tmp_path / "wheels" / "key"
    damage(wheel_dir)
    proc = cached_wheel_check(wheel_dir)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and f"the cached horovod wheel in {wheel_dir} is damaged (" in lines[0], proc.stdout
    assert reason in lines[0] and lines[0].endswith("): building it again"), lines[0]
    assert not wheel_dir.exists() and (tmp_path / "wheels").is_dir()


def test_this_machines_cached_wheels_pass_the_check():
    cache = Path(os.environ.get("HPCGAN_CACHE", Path.home() / ".cache" / "hpcgan"))
    kinds = {"horovod-": ("horovod", "horovod/torch/mpi_lib_v2"), "mpi4py-": ("mpi4py", "mpi4py/MPI.")}
    found = [p for p in sorted((cache / "wheels").glob("*")) if p.name.split("-")[0] + "-" in kinds]
    if not found:
        pytest.skip(f"no wheel cached in {cache}/wheels (scripts/setup.sh puts Horovod's and mpi4py's there)")
    for wheel_dir in found:
        proc = cached_wheel_check(wheel_dir, *kinds[wheel_dir.name.split("-")[0] + "-"])
        assert proc.returncode == 0 and proc.stdout == "", proc.stdout + proc.stderr


def test_cache_wheel_moves_the_wheel_in_whole(tmp_path):
    built = tmp_path / "build"
    wheel_shaped_zip(built / WHEEL_NAME)
    target = tmp_path / "cache" / "wheels" / "key"
    ok('cache_wheel "$@"', str(tmp_path / "cache"), str(target), str(built))
    assert os.listdir(target) == [WHEEL_NAME] and os.listdir(target.parent) == ["key"]  # no partial left
    assert cached_wheel_check(target).returncode == 0
