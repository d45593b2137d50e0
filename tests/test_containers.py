"""containers/: the Apptainer definition and the Dockerfile build the same image; the CPU image
builds and trains on 2 ranks (hybrid model: the host's mpirun, one container per rank) where
apptainer or singularity is installed."""
import os
import re
import shutil

import pytest

from conftest import REPO, mpi_env, mpirun_cmd, requires_mpirun, run_cmd

CONTAINERS = REPO / "containers"
RUNTIME = shutil.which("apptainer") or shutil.which("singularity")
CPU_BUILD_ARGS = {"BASE_IMAGE": "debian:12", "MPI": "debian", "TORCH_INDEX": "https://download.pytorch.org/whl/cpu"}


def def_sections(text: str) -> dict:
    """{section name: body lines} of an Apptainer definition file."""
    sections, name = {}, "header"
    for line in text.splitlines():
        if line.startswith("%"):
            name = line[1:].strip()
            sections[name] = []
        elif line.strip() and not line.lstrip().startswith("#"):
            sections.setdefault(name, []).append(line.strip())
    return sections


def test_def_and_dockerfile_take_the_same_build_arguments_and_sources():
    sections = def_sections((CONTAINERS / "hpcgan.def").read_text())
    def_args = dict(line.split("=", 1) for line in sections["arguments"])
    dockerfile = (CONTAINERS / "Dockerfile").read_text()
    docker_args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile, re.M))
    assert def_args == docker_args
    def_files = sorted(line.split()[0] for line in sections["files"])
    docker_files = sorted(word for line in re.findall(r"^COPY (.+) /opt/hpcgan/\S*$", dockerfile, re.M)
                          for word in line.split())
    assert def_files == docker_files
    for path in def_files:  # everything scripts/setup.sh and `pip install -e` need is copied
        assert (REPO / path).exists(), path
    assert "containers/install.sh" in " ".join(sections["post"]) and "containers/install.sh" in dockerfile
    assert sections["runscript"] == ['exec hpcgan "$@"'] and sections["test"] == ["hpcgan doctor"]
    assert 'bash "$SRC/scripts/setup.sh"' in (CONTAINERS / "install.sh").read_text()  # one way to build Horovod


@pytest.mark.slow
@pytest.mark.mpi
@requires_mpirun
@pytest.mark.skipif(RUNTIME is None, reason="neither apptainer nor singularity is on PATH (Debian 12 packages neither)")
def test_cpu_image_runs_doctor_and_a_two_rank_training(tmp_path, sample_data):
    image = tmp_path / "hpcgan-cpu.sif"
    build = [RUNTIME, "build", *(["--fakeroot"] if os.geteuid() != 0 else [])]
    for key, value in CPU_BUILD_ARGS.items():
        build += ["--build-arg", f"{key}={value}"]
    run_cmd([*build, str(image), str(CONTAINERS / "hpcgan.def")], cwd=REPO, timeout=3600, check=True)

    def in_image(*args):
        return [RUNTIME, "exec", "--bind", str(tmp_path), "--bind", str(sample_data), str(image), "hpcgan", *args]

    doctor = run_cmd(in_image("doctor"), env=mpi_env(), timeout=300)
    assert doctor.returncode == 0 and "training path: ready" in doctor.stdout, doctor.stdout + doctor.stderr
    dataset, run = tmp_path / "dataset", tmp_path / "run"
    run_cmd(in_image("preprocess", "--input", sample_data, "--output", dataset, "--modalities", "t1", "--size", "64",
                     "--slices", "80:100"), env=mpi_env(), timeout=300, check=True)
    train = in_image("train", "--config", "wgan-gp-64", "--data", dataset, "--out", run, "--set", "train.steps=4",
                     "--set", "train.batch_size=4", "--set", "checkpoint.every_steps=2")
    run_cmd(mpirun_cmd(2) + [str(a) for a in train], env=mpi_env(), timeout=600, check=True)
    assert (run / "checkpoints" / "latest").exists()
