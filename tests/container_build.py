"""Build and run the CPU variant of containers/Dockerfile with Debian's podman, for tests.

The machines that run the tests reach Debian's and Python's package registries but not Docker Hub,
and pip works there only through the machine's own configuration (local wheel directories, extra
indexes, a CA bundle for TLS). So, without touching the Dockerfile:
- the base image `docker.io/library/debian:12` is made locally: `mmdebstrap --variant=minbase
  --format=tar bookworm` from the mirror apt uses here, imported into podman; the tarball is cached in
  ~/.cache/hpcgan/base (keyed by suite, variant and mirror), written under a temporary name and renamed
  only once it reads back as a Debian root file system, and a cached entry that does not (a directory,
  a truncated file) is built again;
- podman's own storage (images, build layers) lives in ~/.cache/hpcgan/podman, so that every cache
  the tests use is under $HPCGAN_CACHE and an empty one (`make test-fresh`) starts from nothing;
- the build binds, read-only, a pip.conf rebuilt from this machine's `pip config list` at
  /etc/pip.conf, the local directories it names at their own paths, and the CA bundle; the
  Dockerfile's `TORCH_INDEX` is emptied so that pip uses that configuration;
- ~/.cache/hpcgan/wheels is bound at /var/cache/hpcgan/wheels, where containers/install.sh keeps the
  Horovod and mpi4py wheels (the same keys as scripts/setup.sh's), so they are compiled once per
  machine, not per image build;
- podman runs with `--runtime runc` (crun refuses this machine's hybrid cgroups), `--network host` and
  a containers.conf of `default_ulimits = []` and `cgroup_manager = "cgroupfs"` (shared/NOTES.md).
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

CACHE = Path(os.environ.get("HPCGAN_CACHE", Path.home() / ".cache" / "hpcgan"))
BASE_IMAGE = "docker.io/library/debian:12"
PACKAGES = ("podman", "runc", "mmdebstrap", "uidmap")
CONTAINERS_CONF = """[containers]
default_ulimits = []

[engine]
cgroup_manager = "cgroupfs"
"""


class PodmanUnavailable(Exception):
    """podman cannot be installed or run here (the reason is the message)."""


def _run(cmd, timeout, env=None, check=True, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def ensure_podman():
    """apt-get install podman, runc, mmdebstrap when missing (root on Debian only)."""
    if all(shutil.which(p) for p in ("podman", "runc", "mmdebstrap")):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise PodmanUnavailable(
            "podman, runc and mmdebstrap are not installed and cannot be installed here (needs root and apt-get)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "-o", "DPkg::Lock::Timeout=300", "--no-install-recommends", *PACKAGES],
    ):
        proc = _run(cmd, timeout=900, env=env, check=False)
        if proc.returncode != 0:
            raise PodmanUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")


def apt_mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 `URIs:` or a one-line `deb` entry)."""
    for path in sorted(Path("/etc/apt").glob("sources.list.d/*.sources")) + [Path("/etc/apt/sources.list")]:
        if not path.exists():
            continue
        text = path.read_text()
        for block in text.split("\n\n"):
            if re.search(r"^Suites:.*\bbookworm\b", block, re.M) and re.search(r"^Components:.*\bmain\b", block, re.M):
                found = re.search(r"^URIs:\s*(\S+)", block, re.M)
                if found and not found.group(1).endswith("-security"):
                    return found.group(1)
        found = re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M)
        if found:
            return found.group(1)
    raise PodmanUnavailable("no Debian bookworm mirror found in /etc/apt/sources.list(.d)")


def tarball_problem(path: Path) -> str | None:
    """Why PATH is not a usable base-image tarball (None when it is): it must be a regular file that
    reads to its end as a tar archive of a Debian root file system."""
    if not path.exists() and not path.is_symlink():
        return "missing"
    if path.is_symlink() or not path.is_file():
        return "not a regular file" + (" (a directory)" if path.is_dir() else "")
    try:
        with tarfile.open(path) as archive:
            names = {name.removeprefix("./") for name in archive.getnames()}
    except (tarfile.TarError, EOFError, OSError) as exc:
        return f"not a readable tar archive ({exc})"
    missing = [name for name in ("etc/debian_version", "usr/bin/apt-get") if name not in names]
    return f"not a Debian root file system (no {', '.join(missing)})" if missing else None


def base_tarball(cache: Path = CACHE) -> Path:
    """The debian:12 minbase tarball in CACHE/base, built with mmdebstrap when it is missing or damaged."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"bookworm-minbase-{mirror}".encode()).hexdigest()[:12]
    tarball = Path(cache) / "base" / f"debian-12-minbase-{key}.tar"
    problem = tarball_problem(tarball)
    if problem is None:
        return tarball
    if problem != "missing":
        print(f"container_build: the cached base image {tarball} is {problem}: building it again", file=sys.stderr)
        if tarball.is_dir() and not tarball.is_symlink():
            shutil.rmtree(tarball)
        else:
            tarball.unlink()
    tarball.parent.mkdir(parents=True, exist_ok=True)
    # mmdebstrap picks its output format from the file name unless told: say tar, and end the name in .tar.
    partial = tarball.with_name(f"{tarball.stem}.partial-{os.getpid()}.tar")
    try:
        _run(["mmdebstrap", "--variant=minbase", "--format=tar", "bookworm", partial, mirror], timeout=900)
        problem = tarball_problem(partial)
        if problem is not None:
            raise RuntimeError(f"mmdebstrap wrote {partial}, which is {problem}")
        partial.rename(tarball)
    finally:
        if partial.is_dir():
            shutil.rmtree(partial)
        partial.unlink(missing_ok=True)
    return tarball


class Podman:
    """podman with this machine's workarounds; `root` holds the containers.conf and build files."""

    def __init__(self, root: Path, cache: Path = CACHE):
        self.root = Path(root)
        self.cache = Path(cache)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "containers.conf").write_text(CONTAINERS_CONF)
        self.env = dict(os.environ, CONTAINERS_CONF=str(self.root / "containers.conf"))
        # Images and layers in the cache, podman's run-time state beside them: a store of its own per cache.
        store = self.cache / "podman"
        self.storage = ["--root", store / "storage", "--runroot", store / "run", "--tmpdir", store / "libpod"]

    def __call__(self, *args, timeout=600, check=True) -> subprocess.CompletedProcess:
        return _run(["podman", "--runtime", "runc", *self.storage, *args], timeout=timeout, env=self.env, check=check)

    def has_image(self, name: str) -> bool:
        return self("image", "exists", name, check=False).returncode == 0

    def ensure_base_image(self):
        """debian:12 from the cached mmdebstrap tarball (see base_tarball), imported once per podman store."""
        if not self.has_image(BASE_IMAGE):
            self("import", base_tarball(self.cache), BASE_IMAGE, timeout=600)

    def pip_mounts(self) -> list[str]:
        """`-v` options that give a build this machine's pip configuration (see the module docstring)."""
        conf = _run([sys.executable, "-m", "pip", "config", "list"], timeout=60, check=False).stdout
        values = {}
        for line in conf.splitlines():
            key, _, value = line.partition("=")
            name = key.split(".")[-1]
            if name in ("find-links", "extra-index-url", "index-url", "cert", "trusted-host"):
                values.setdefault(name, value.strip().strip("'\""))
        mounts, lines = [], ["[global]"]
        for name in ("index-url", "extra-index-url", "find-links", "trusted-host"):
            if name not in values:
                continue
            lines.append(f"{name} = {values[name]}")
            for location in values[name].split():
                path = location.removeprefix("file://").rstrip("/")
                if path.endswith("/simple"):  # a local index: its pages link to files beside it
                    path = os.path.dirname(path)
                if path.startswith("/") and os.path.isdir(path):
                    mounts += ["-v", f"{path}:{path}:ro"]
        if "cert" in values and os.path.isfile(values["cert"]):
            mounts += ["-v", f"{values['cert']}:/run/hpcgan-host-ca.crt:ro"]
            lines.append("cert = /run/hpcgan-host-ca.crt")
        pip_conf = self.root / "pip.conf"
        pip_conf.write_text("\n".join(lines) + "\n")
        return ["-v", f"{pip_conf}:/etc/pip.conf:ro", *mounts]

    def build_cpu_image(self, repo: Path, tag: str, torch_spec: str) -> tuple[float, str]:
        """Build the Dockerfile's CPU variant; returns the seconds it took and the build log. The layers of
        an earlier build that this one replaced (untagged now) are removed, so that the store does not grow
        with each change."""
        wheels = self.cache / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        args = {"BASE_IMAGE": BASE_IMAGE, "MPI": "debian", "TORCH_INDEX": "", "TORCH_SPEC": torch_spec}
        started = time.monotonic()
        build = self(
            "build",
            "--network",
            "host",
            "-f",
            repo / "containers" / "Dockerfile",
            *[a for k, v in args.items() for a in ("--build-arg", f"{k}={v}")],
            *self.pip_mounts(),
            "-v",
            f"{wheels}:/var/cache/hpcgan/wheels",
            "-t",
            tag,
            repo,
            timeout=3000,
        )
        seconds = time.monotonic() - started
        self("image", "prune", "--force", timeout=600)
        return seconds, build.stdout + build.stderr

    def image_size(self, tag: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def run(self, tag: str, command: str, binds=(), env=None, timeout=600, check=True):
        """`bash -c COMMAND` in a fresh container of TAG, with host directories bound at their own paths."""
        opts = ["--rm", "--network", "host", "--entrypoint", "bash"]
        for path in binds:
            opts += ["-v", f"{path}:{path}"]
        for key, value in (env or {}).items():
            opts += ["-e", f"{key}={value}"]
        return self("run", *opts, tag, "-c", command, timeout=timeout, check=check)
