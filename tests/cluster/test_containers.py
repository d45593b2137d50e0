"""containers/: the Apptainer definition and the Dockerfile build the same image. The Dockerfile's
CPU variant is really built with podman (tests/container_build.py) and, inside it, `hpcgan doctor`
passes, a 2-rank Horovod training on real brain MRI checkpoints and `hpcgan sample` writes a stack.
With apptainer or singularity installed, the .def is built and trains on 2 ranks too (hybrid model:
the host's mpirun, one container per rank)."""

import json
import os
import re
import shutil
import subprocess
import tarfile

import pytest

from conftest import REPO, mpi_env, mpirun_cmd, requires_mpirun, run_cmd
from container_build import Podman, PodmanUnavailable, base_tarball, ensure_podman, tarball_problem

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
    copied = [word for line in re.findall(r"^COPY (.+) /opt/hpcgan/\S*$", dockerfile, re.M) for word in line.split()]
    # The Dockerfile copies a few files early (its dependencies layer) and their folders later.
    docker_files = sorted({path for path in copied if not any(path.startswith(f"{other}/") for other in copied)})
    assert def_files == docker_files
    for path in def_files:  # everything scripts/setup.sh and `pip install -e` need is copied
        assert (REPO / path).exists(), path
    assert "containers/install.sh" in " ".join(sections["post"]) and "containers/install.sh" in dockerfile
    assert sections["runscript"] == ['exec hpcgan "$@"'] and sections["test"] == ["hpcgan doctor"]
    assert 'bash "$SRC/scripts/setup.sh"' in (CONTAINERS / "install.sh").read_text()  # one way to build Horovod


# What decides the dependencies layer: scripts/setup.sh installs from these alone (hpcgan's version and
# requirements, the set-up and its Horovod decisions, the image's install script).
DEPENDENCY_FILES = {
    "setup.cfg",
    "pyproject.toml",
    "hpcgan/__init__.py",
    "scripts/setup.sh",
    "scripts/horovod-build.sh",
    "containers/install.sh",
}


def test_the_dockerfile_installs_dependencies_before_it_copies_the_sources():
    lines = (CONTAINERS / "Dockerfile").read_text().splitlines()
    install = next(i for i, line in enumerate(lines) if line.startswith("RUN "))
    assert "containers/install.sh" in " ".join(lines[install : install + 3])
    before = {word for line in lines[:install] if line.startswith("COPY ") for word in line.split()[1:-1]}
    after = {word for line in lines[install:] if line.startswith("COPY ") for word in line.split()[1:-1]}
    assert before == DEPENDENCY_FILES
    assert {"hpcgan", "configs", "scripts", "slurm", "containers", "README.md"} <= after
    # setup.cfg reads nothing that only the later layer has (a README change must not re-run install.sh)
    assert "file:" not in (REPO / "setup.cfg").read_text()


def test_a_tarball_that_is_not_a_debian_root_file_system_is_refused(tmp_path):
    assert tarball_problem(tmp_path / "none.tar") == "missing"
    (tmp_path / "dir.tar").mkdir()
    assert tarball_problem(tmp_path / "dir.tar") == "not a regular file (a directory)"
    (tmp_path / "junk.tar").write_bytes(b"not a tar archive at all" * 100)
    assert tarball_problem(tmp_path / "junk.tar").startswith("not a readable tar archive")
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "debian_version").write_text("12.0\n")
    with tarfile.open(tmp_path / "partial-root.tar", "w") as archive:
        archive.add(tmp_path / "etc", arcname="./etc")
    assert tarball_problem(tmp_path / "partial-root.tar") == "not a Debian root file system (no usr/bin/apt-get)"


def podman_or_skip():
    """Installs podman, runc and mmdebstrap where missing, or skips the test saying why it cannot."""
    if os.geteuid() != 0:
        pytest.skip("mmdebstrap and podman need root here (rootless podman needs subuid ranges)")
    try:
        ensure_podman()
    except PodmanUnavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.slow
def test_the_base_image_tarball_builds_into_an_empty_cache_and_a_damaged_one_again(tmp_path, capsys):
    podman_or_skip()
    cache = tmp_path / "cache"
    tarball = base_tarball(cache)
    assert tarball.is_file() and tarball_problem(tarball) is None
    assert os.listdir(tarball.parent) == [tarball.name]  # no partial left beside it
    assert "building it again" not in capsys.readouterr().err
    with tarfile.open(tarball) as archive:
        assert archive.getmember("./etc/debian_version").isfile()
    assert base_tarball(cache) == tarball and "building it again" not in capsys.readouterr().err  # kept

    tarball.write_bytes(tarball.read_bytes()[:1_000_000])  # an interrupted copy
    assert tarball_problem(tarball).startswith("not a readable tar archive")
    tarball.unlink()
    (tarball / "etc").mkdir(parents=True)  # what the bug left: mmdebstrap's directory output named *.tar
    assert base_tarball(cache) == tarball
    err = capsys.readouterr().err
    assert f"the cached base image {tarball} is not a regular file (a directory): building it again" in err
    assert tarball.is_file() and tarball_problem(tarball) is None
    assert os.listdir(tarball.parent) == [tarball.name]


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
    run_cmd(
        in_image(
            "preprocess",
            "--input",
            sample_data,
            "--output",
            dataset,
            "--modalities",
            "t1",
            "--size",
            "64",
            "--slices",
            "80:100",
        ),
        env=mpi_env(),
        timeout=300,
        check=True,
    )
    train = in_image(
        "train",
        "--config",
        "wgan-gp-64",
        "--data",
        dataset,
        "--out",
        run,
        "--set",
        "train.steps=4",
        "--set",
        "train.batch_size=4",
        "--set",
        "checkpoint.every_steps=2",
    )
    run_cmd(mpirun_cmd(2) + [str(a) for a in train], env=mpi_env(), timeout=600, check=True)
    assert (run / "checkpoints" / "latest").exists()


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory, report_figure):
    """The CPU image built from containers/Dockerfile; (podman, tag). Built once per test session;
    podman's layer cache (the dependencies layer) and the wheels in ~/.cache/hpcgan make a rebuild cheap."""
    podman_or_skip()
    import torch

    podman = Podman(tmp_path_factory.mktemp("podman"))
    podman.ensure_base_image()
    tag = "localhost/hpcgan:cpu-test"
    seconds, log = podman.build_cpu_image(REPO, tag, torch_spec=f"torch=={torch.__version__}")
    size = podman.image_size(tag)
    layer = "dependencies layer from cache" if install_step_cached(log) else "dependencies layer built"
    report_figure(f"container image {tag}: built in {seconds:.0f} s ({layer}), {size / 1e9:.2f} GB")
    return podman, tag


def install_step_cached(build_log: str) -> bool:
    """Whether podman took the `RUN ... install.sh` step from its layer cache, by its build log."""
    steps = re.split(r"^STEP \d+/\d+: ", build_log, flags=re.M)
    install = [s for s in steps if s.startswith("RUN ") and "containers/install.sh" in "".join(s.splitlines()[:3])]
    assert len(install) == 1, build_log[-3000:]
    return "--> Using cache" in install[0]


@pytest.mark.slow
def test_a_source_change_rebuilds_the_image_without_reinstalling_its_dependencies(cpu_image, tmp_path):
    podman, tag = cpu_image
    import torch

    context = tmp_path / "context"  # the tracked files, as a clone would have them, with one source changed
    listing = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
    tracked = subprocess.run(listing, cwd=REPO, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (REPO / name).is_file():
            (context / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, context / name)
    marker = "# a source change made by test_containers.py"
    with open(context / "hpcgan" / "cli.py", "a") as source:
        source.write(f"\n{marker}\n")
    changed = "localhost/hpcgan:cpu-test-changed"
    try:
        _, log = podman.build_cpu_image(context, changed, torch_spec=f"torch=={torch.__version__}")
        assert install_step_cached(log), log[-3000:]
        assert marker in podman.run(changed, "tail -1 /opt/hpcgan/hpcgan/cli.py").stdout
        assert "training path: ready" in podman.run(changed, "hpcgan doctor", timeout=300).stdout
    finally:
        podman("rmi", "--force", changed, check=False)


@pytest.mark.slow
@pytest.mark.mpi
def test_built_image_runs_doctor_a_two_rank_training_and_sampling(cpu_image, sample_data, tmp_path):
    podman, tag = cpu_image
    versions = podman.run(tag, "cat /opt/hpcgan-versions").stdout
    assert "horovod 0.28.1" in versions and "+cpu" in versions, versions
    doctor = podman.run(tag, "hpcgan doctor", timeout=300, check=False)
    assert doctor.returncode == 0 and "training path: ready" in doctor.stdout, doctor.stdout + doctor.stderr
    dataset, run, samples = tmp_path / "dataset", tmp_path / "run", tmp_path / "samples"
    script = " && ".join(
        [
            f"hpcgan preprocess --input {sample_data} --output {dataset} --modalities t1 --size 64 --slices 80:100",
            f"mpirun -np 2 --oversubscribe --bind-to none hpcgan train --config wgan-gp-64 --data {dataset} "
            f"--out {run} --set train.steps=4 --set train.batch_size=4 --set checkpoint.every_steps=2 "
            "--set log.sample_every_steps=0",
            f"hpcgan sample --checkpoint {run} --out {samples} --stack-size 10 --format h5,nifti",
        ]
    )
    env = {
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMP_NUM_THREADS": "1",
        "OMPI_MCA_btl_vader_single_copy_mechanism": "none",
    }
    result = podman.run(tag, script, binds=(tmp_path, sample_data), env=env, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    checkpoints = sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt"))
    assert checkpoints[-1] == "ckpt-00000004.pt", checkpoints
    run_env = json.loads((run / "env.json").read_text())
    assert run_env["backend"] == "horovod" and run_env["world_size"] == 2, run_env
    assert (samples / "index.json").exists() and (samples / "stack-00000.h5").exists()
    assert (samples / "stack-00000.nii.gz").exists()
