"""A real single-node Slurm cluster on localhost for tests (Debian's slurm-wlm + munge).

Everything lives in one temp dir: slurm.conf, state, spool, logs, pid files and munged's own
socket and key, on free ports, so it never touches a system Slurm or another engineer's test
cluster. Used by tests/test_slurm.py; facts it relies on are in shared/NOTES.md.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}


class SlurmUnavailable(Exception):
    """Slurm cannot be installed or started here (the reason is the message)."""


def _missing_daemons():
    paths = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
    return [name for name, path in paths.items() if shutil.which(name) is None and not os.path.exists(path)]


def ensure_slurm_installed(timeout=600):
    """apt-get install slurm-wlm munge when missing; SlurmUnavailable if that is not possible."""
    if not _missing_daemons() and shutil.which("sbatch"):
        return
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SlurmUnavailable("Slurm (slurm-wlm, munge) is not installed and cannot be installed here "
                               "(needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *SLURM_PACKAGES]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise SlurmUnavailable(f"{' '.join(cmd)} timed out after {timeout}s") from None
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
    if _missing_daemons() or not shutil.which("sbatch"):
        raise SlurmUnavailable(f"apt-get installed {SLURM_PACKAGES} but {_missing_daemons()} are still missing")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, env, timeout=60, check=True, cwd=None):
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _parse_fields(line: str) -> dict:
    """`scontrol show job -o` prints Key=Value pairs separated by spaces (values have none but Command)."""
    fields = {}
    for item in line.split():
        key, sep, value = item.partition("=")
        if sep:
            fields[key] = value
    return fields


class SlurmCluster:
    """munged + slurmctld + slurmd on this host; `env` is what sbatch/squeue/scontrol need."""

    def __init__(self, root: Path | None = None, cpus: int = 8):
        # Our own dir under /tmp: munged (user munge) must reach it, and socket paths must stay short.
        self.root = Path(root or tempfile.mkdtemp(prefix="hpcgan-slurm-"))
        self.cpus = cpus  # claimed with SlurmdParameters=config_overrides: more than the cores is fine
        self.node = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.env = self.client_env(os.environ)

    def client_env(self, environ) -> dict:
        """`environ` for sbatch/srun/squeue of this cluster: no SLURM_*/SBATCH_* from an outer job."""
        env = {k: v for k, v in environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        return env

    # --- start / stop ---------------------------------------------------------------------------
    def start(self, timeout=60):
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)  # munged (user munge) must reach its socket dir
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        self._start_munged()
        self._write_conf()
        _run(["slurmctld", "-f", str(self.conf)], self.env)
        _run(["slurmd", "-f", str(self.conf)], self.env)
        self._wait_idle(timeout)

    def _start_munged(self):
        import pwd

        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = self.munge_dir / "munge.key"
        shutil.copyfile("/etc/munge/munge.key", key)  # the key the package created; a copy we own
        os.chmod(key, 0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o755)  # root's slurm daemons connect to the socket in here
        d = self.munge_dir
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", f"--socket={self.munge_socket}",
              f"--key-file={key}", f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
              f"--seed-file={d / 'munged.seed'}"], self.env)

    def _write_conf(self):
        r = self.root
        self.conf.write_text(f"""\
# A single-node test cluster written by tests/slurm_cluster.py.
ClusterName=hpcgantest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
MpiDefault=pmix
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=600
KillWait=10
InactiveLimit=0
SchedulerParameters=sched_interval=2
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout):
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = _run(["sinfo", "-h", "-o", "%t"], self.env, check=False, timeout=20)
            state = proc.stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"node not idle after {timeout}s (sinfo says {state!r}); logs in {self.root / 'log'}")

    def stop(self):
        """Whatever happened: scontrol shutdown, then kill what is left by its pid file."""
        if self.conf.exists():
            try:
                _run(["scontrol", "shutdown"], self.env, check=False, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 15
        pid_files = [self.root / "slurmctld.pid", self.root / "slurmd.pid"]
        while time.monotonic() < deadline and any(_alive(p) for p in pid_files):
            time.sleep(0.3)
        for pid_file in pid_files + [self.munge_dir / "munged.pid"]:
            _kill(pid_file)

    # --- jobs -------------------------------------------------------------------------------------
    def sbatch(self, *args, env=None, cwd=None) -> str:
        """Submit; returns the job id (sbatch --parsable)."""
        proc = _run(["sbatch", "--parsable", *map(str, args)], self.client_env(env or self.env), check=False,
                    timeout=60, cwd=cwd)
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id) -> list[dict]:
        """`scontrol show job` fields, one dict per job (array tasks are separate jobs)."""
        proc = _run(["scontrol", "show", "job", "-o", str(job_id)], self.env, check=False, timeout=30)
        return [_parse_fields(line) for line in proc.stdout.splitlines() if line.strip()]

    def wait(self, job_id, timeout, until=FINAL_STATES) -> list[dict]:
        """Poll until every job of job_id reaches one of `until`; fail with the job's logs on timeout."""
        deadline = time.monotonic() + timeout
        jobs = []
        while time.monotonic() < deadline:
            jobs = self.jobs(job_id)
            if jobs and all(j.get("JobState") in until for j in jobs):
                return jobs
            time.sleep(1)
        _run(["scancel", str(job_id)], self.env, check=False)
        raise TimeoutError(f"job {job_id} not in {sorted(until)} after {timeout}s: "
                           f"{[(j.get('JobId'), j.get('JobState'), j.get('Reason')) for j in jobs]}")

    def release_requeued(self, job_id, timeout=60):
        """Start a requeued job now instead of after Slurm's ~2 minute hold (an operator's
        `scontrol update StartTime=now`), once the slurmstepd processes of its last run are gone:
        the new run reuses the same step ids."""
        deadline = time.monotonic() + timeout
        while _run(["pgrep", "-f", rf"slurmstepd: \[{job_id}\."], self.env, check=False).returncode == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the steps of job {job_id} still run {timeout}s after it was requeued")
            time.sleep(0.5)
        _run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], self.env)

    def signal_batch(self, job_id, signal="USR1"):
        _run(["scancel", f"--signal={signal}", "--batch", str(job_id)], self.env)


def _alive(pid_file: Path) -> bool:
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
        return True
    except (OSError, ValueError):
        return False


def _kill(pid_file: Path):
    try:
        os.kill(int(pid_file.read_text().strip()), 15)
    except (OSError, ValueError):
        pass
