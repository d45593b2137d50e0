"""Real Slurm clusters for tests (Debian's slurm-wlm + munge): one node on localhost
(SlurmCluster, tests/cluster/test_slurm.py), or N nodes in network namespaces on this machine
(MultiNodeSlurmCluster, tests/cluster/test_multinode.py).

Everything lives in one temp dir: slurm.conf, state, spool, logs, pid files and munged's own
socket and a freshly generated key, on free ports, so it never touches a system Slurm or another
engineer's test cluster. Facts it relies on are in shared/NOTES.md.

By hand (as root), a 3-node cluster until Ctrl-C; it prints the commands to use it:

    python -m tests.slurm_cluster --nodes 3
"""

import argparse
import ipaddress
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

SLURM_PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")
FINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
}


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
        raise SlurmUnavailable(
            "Slurm (slurm-wlm, munge) is not installed and cannot be installed here (needs root and apt-get)"
        )
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
        self.client_prefix: list[str] = []  # what runs a Slurm client command where the cluster is

    def client_cmd(self, cmd) -> list[str]:
        """`cmd` (sbatch, srun, a script calling them) as it must run to reach this cluster."""
        return [*self.client_prefix, *map(str, cmd)]

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
        self.conf.write_text(self._conf_text())
        self._start_daemons()
        self._wait_idle(timeout)

    def _start_daemons(self):
        _run(["slurmctld", "-f", str(self.conf)], self.env)
        _run(["slurmd", "-f", str(self.conf)], self.env)

    def _start_munged(self):
        import pwd

        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o700, exist_ok=True)
        key = self.munge_dir / "munge.key"
        key.write_bytes(os.urandom(1024))  # this cluster's own key: no other munged accepts its credentials
        os.chmod(key, 0o400)
        for path in (self.munge_dir, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(self.munge_dir, 0o755)  # root's slurm daemons connect to the socket in here
        d = self.munge_dir
        _run(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                "/usr/sbin/munged",
                f"--socket={self.munge_socket}",
                f"--key-file={key}",
                f"--pid-file={d / 'munged.pid'}",
                f"--log-file={d / 'munged.log'}",
                f"--seed-file={d / 'munged.seed'}",
            ],
            self.env,
        )

    def _conf_text(self) -> str:
        r = self.root
        return (
            self._common_conf()
            + f"""\
SlurmdSpoolDir={r / "spool"}
SlurmdPidFile={r / "slurmd.pid"}
SlurmdLogFile={r / "log" / "slurmd.log"}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _common_conf(self, controller=None) -> str:
        """slurm.conf without the slurmd paths and the nodes."""
        r = self.root
        return f"""\
# A test cluster written by tests/slurm_cluster.py.
ClusterName=hpcgantest
SlurmctldHost={controller or f"{self.node}(127.0.0.1)"}
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
StateSaveLocation={r / "state"}
SlurmctldPidFile={r / "slurmctld.pid"}
SlurmctldLogFile={r / "log" / "slurmctld.log"}
SlurmctldDebug=info
SlurmdDebug=info
MinJobAge=600
KillWait=10
InactiveLimit=0
SchedulerParameters=sched_interval=2
"""

    def _wait_idle(self, timeout):
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            proc = _run(self.client_cmd(["sinfo", "-h", "-N", "-o", "%t"]), self.env, check=False, timeout=20)
            state = proc.stdout.strip()
            if state and set(state.split()) == {"idle"}:
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes not idle after {timeout}s (sinfo says {state!r}); logs in {self.root / 'log'}")

    def stop(self):
        """Whatever happened: scontrol shutdown, then kill what is left by its pid file."""
        if self.conf.exists():
            try:
                _run(self.client_cmd(["scontrol", "shutdown"]), self.env, check=False, timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 15
        pid_files = [self.root / "slurmctld.pid", *self.slurmd_pid_files()]
        while time.monotonic() < deadline and any(_alive(p) for p in pid_files):
            time.sleep(0.3)
        for pid_file in pid_files + [self.munge_dir / "munged.pid"]:
            _kill(pid_file)

    def slurmd_pid_files(self) -> list[Path]:
        return [self.root / "slurmd.pid"]

    # --- jobs -------------------------------------------------------------------------------------
    def sbatch(self, *args, env=None, cwd=None) -> str:
        """Submit; returns the job id (sbatch --parsable)."""
        proc = _run(
            self.client_cmd(["sbatch", "--parsable", *args]),
            self.client_env(env or self.env),
            check=False,
            timeout=60,
            cwd=cwd,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(map(str, args))} failed: {proc.stderr.strip()}")
        return proc.stdout.strip().split(";")[0]

    def jobs(self, job_id) -> list[dict]:
        """`scontrol show job` fields, one dict per job (array tasks are separate jobs)."""
        proc = _run(self.client_cmd(["scontrol", "show", "job", "-o", job_id]), self.env, check=False, timeout=30)
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
        _run(self.client_cmd(["scancel", job_id]), self.env, check=False)
        raise TimeoutError(
            f"job {job_id} not in {sorted(until)} after {timeout}s: "
            f"{[(j.get('JobId'), j.get('JobState'), j.get('Reason')) for j in jobs]}"
        )

    def release_requeued(self, job_id, timeout=60):
        """Start a requeued job now instead of after Slurm's ~2 minute hold (an operator's
        `scontrol update StartTime=now`), once the slurmstepd processes of its last run are gone:
        the new run reuses the same step ids."""
        deadline = time.monotonic() + timeout
        while _run(["pgrep", "-f", rf"slurmstepd: \[{job_id}\."], self.env, check=False).returncode == 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the steps of job {job_id} still run {timeout}s after it was requeued")
            time.sleep(0.5)
        _run(self.client_cmd(["scontrol", "update", f"JobId={job_id}", "StartTime=now"]), self.env)

    def signal_batch(self, job_id, signal="USR1"):
        _run(self.client_cmd(["scancel", f"--signal={signal}", "--batch", job_id]), self.env)


# The only addresses the multi-node cluster uses; they live on its own bridge and veths, inside
# namespaces it creates, so no packet leaves them.
NETWORK = ipaddress.ip_network("10.213.0.0/24")
NETNS_DIR = Path("/var/run/netns")


class MultiNodeSlurmCluster(SlurmCluster):
    """N Slurm nodes on this machine, like a small cluster with a shared file system.

    A "hub" network namespace holds a bridge (the cluster's network), slurmctld and the clients
    (sbatch, srun: run them through `client_cmd`). Node K is a network namespace of its own with
    eth0 on a veth link to the bridge, its own hostname `nodeK` (a UTS namespace) and an /etc/hosts
    naming every node (a mount namespace), and runs `slurmd -N nodeK`; its job steps live there
    too. The namespaces share the file system, /dev/shm included, so shared-memory MPI transports
    must be kept off between ranks of different nodes (see tests/cluster/test_multinode.py).
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, root: Path | None = None):
        super().__init__(root, cpus=cpus_per_node)
        tag = uuid.uuid4().hex[:6]  # several clusters (or engineers) on one machine never collide
        self.node = "hub"
        self.hub_ns = f"hpcgan-{tag}-hub"
        self.node_names = [f"node{k}" for k in range(1, nodes + 1)]
        self.node_ns = {name: f"hpcgan-{tag}-{name}" for name in self.node_names}
        addresses = list(NETWORK.hosts())
        self.hub_addr = str(addresses[0])
        self.addr = {name: str(addresses[9 + k]) for k, name in enumerate(self.node_names, 1)}
        self.hub_link = {name: f"veth-{name}" for name in self.node_names}  # the hub's end of each node's link
        self.hosts_file = self.root / "hosts"
        self.client_prefix = ["nsenter", f"--net={NETNS_DIR / self.hub_ns}"]

    def start(self, timeout=60):
        if os.geteuid() != 0:
            raise SlurmUnavailable("a multi-node cluster needs root (network namespaces)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._make_network()
        super().start(timeout)

    def _make_network(self):
        try:
            _run(["ip", "netns", "add", self.hub_ns], self.env)
        except (OSError, RuntimeError) as exc:
            raise SlurmUnavailable(f"network namespaces are not available here: {exc}") from None
        hub = ["ip", "-n", self.hub_ns]
        _run([*hub, "link", "set", "lo", "up"], self.env)
        _run([*hub, "link", "add", "br0", "type", "bridge"], self.env)
        _run([*hub, "addr", "add", f"{self.hub_addr}/{NETWORK.prefixlen}", "dev", "br0"], self.env)
        _run([*hub, "link", "set", "br0", "up"], self.env)
        for name, ns in self.node_ns.items():
            _run(["ip", "netns", "add", ns], self.env)
            _run(
                [*hub, "link", "add", self.hub_link[name], "type", "veth", "peer", "name", "eth0", "netns", ns],
                self.env,
            )
            _run([*hub, "link", "set", self.hub_link[name], "master", "br0", "up"], self.env)
            node = ["ip", "-n", ns]
            _run([*node, "addr", "add", f"{self.addr[name]}/{NETWORK.prefixlen}", "dev", "eth0"], self.env)
            _run([*node, "link", "set", "eth0", "up"], self.env)
            _run([*node, "link", "set", "lo", "up"], self.env)
        names = [f"{self.hub_addr} hub", *(f"{self.addr[n]} {n}" for n in self.node_names)]
        self.hosts_file.write_text("127.0.0.1 localhost\n" + "\n".join(names) + "\n")

    def in_namespace(self, ns: str, hostname: str, cmd) -> list[str]:
        """`cmd` inside network namespace `ns` with its own hostname and the cluster's /etc/hosts.
        nsenter, not `ip netns exec`: that remounts /sys, and slurmd then finds no cgroup file system."""
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return [
            "nsenter",
            f"--net={NETNS_DIR / ns}",
            "unshare",
            "--uts",
            "--mount",
            "sh",
            "-c",
            script,
            "sh",
            str(self.hosts_file),
            hostname,
            *map(str, cmd),
        ]

    def _conf_text(self) -> str:
        r = self.root
        nodes = "\n".join(
            f"NodeName={n} NodeAddr={self.addr[n]} NodeHostname={n} CPUs={self.cpus} RealMemory=8000 State=UNKNOWN"
            for n in self.node_names
        )
        # Per-node spool, pid, log and TmpFS (%n = node name): the nodes share one file system.
        # SlurmdTimeout: a node that stops answering is declared down, and its jobs NODE_FAIL, after
        # 20 s (Slurm's default is 300 s).
        return (
            self._common_conf(controller=f"hub({self.hub_addr})")
            + f"""\
SlurmdSpoolDir={r / "spool" / "%n"}
SlurmdPidFile={r / "slurmd-%n.pid"}
SlurmdLogFile={r / "log" / "slurmd-%n.log"}
TmpFS={r / "tmp" / "%n"}
SlurmdTimeout=20
{nodes}
PartitionName=debug Nodes={",".join(self.node_names)} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _start_daemons(self):
        _run(self.in_namespace(self.hub_ns, "hub", ["slurmctld", "-f", self.conf]), self.env)
        for name in self.node_names:
            self.start_node(name)

    def start_node(self, name: str):
        """slurmd of node `name` (again, after kill_node: the node then returns to service by itself)."""
        for sub in ("spool", "tmp"):
            (self.root / sub / name).mkdir(parents=True, exist_ok=True)
        # PMIx puts its per-job directories in TMPDIR: one per node, or the second node's clash.
        env = dict(self.env, TMPDIR=str(self.root / "tmp" / name))
        _run(self.in_namespace(self.node_ns[name], name, ["slurmd", "-N", name, "-f", self.conf]), env)

    def kill_node(self, name: str, timeout=10) -> int:
        """The node dies: SIGKILL to every process in its namespace (slurmd, slurmstepd, ranks) until
        none is left; the number of processes killed."""
        return self._kill_namespace(self.node_ns[name], timeout)

    def _kill_namespace(self, ns: str, timeout) -> int:
        killed = set()
        deadline = time.monotonic() + timeout
        while (pids := self.namespace_pids(ns)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, 9)
                    killed.add(pid)
                except OSError:
                    pass
            time.sleep(0.1)
        return len(killed)

    def cut_link(self, name: str):
        """A network partition: node `name`'s link goes down at the hub's end of its veth; its
        processes go on running, cut off from every other node and from slurmctld."""
        _run(["ip", "-n", self.hub_ns, "link", "set", self.hub_link[name], "down"], self.env)

    def restore_link(self, name: str):
        _run(["ip", "-n", self.hub_ns, "link", "set", self.hub_link[name], "up"], self.env)

    def slurmd_pid_files(self) -> list[Path]:
        return [self.root / f"slurmd-{name}.pid" for name in self.node_names]

    def namespace_pids(self, ns: str) -> list[int]:
        proc = _run(["ip", "netns", "pids", ns], self.env, check=False)
        return [int(pid) for pid in proc.stdout.split()]

    def link_bytes(self, name: str) -> int:
        """Bytes received plus sent on node `name`'s link, counted at the hub's end of its veth."""
        total = 0
        for counter in ("rx_bytes", "tx_bytes"):
            path = f"/sys/class/net/{self.hub_link[name]}/statistics/{counter}"
            total += int(_run(["ip", "netns", "exec", self.hub_ns, "cat", path], self.env).stdout)
        return total

    def stop(self):
        """Daemons first (by pid), then whatever still runs in the namespaces (job steps of this
        cluster), then the namespaces, which takes the bridge and the veths with them."""
        super().stop()
        for ns in [*self.node_ns.values(), self.hub_ns]:
            if (NETNS_DIR / ns).exists():
                self._kill_namespace(ns, timeout=10)
                _run(["ip", "netns", "del", ns], self.env, check=False)


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


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m tests.slurm_cluster",
        description="Start a multi-node test Slurm in network namespaces until Ctrl-C (root).",
    )
    parser.add_argument("--nodes", type=int, default=2, help="number of nodes (default: 2)")
    parser.add_argument("--cpus-per-node", type=int, default=2, help="CPUs each node offers (default: 2)")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.cpus_per_node < 1:
        parser.error("--nodes and --cpus-per-node must be at least 1")
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill PID` tears down too
    try:
        ensure_slurm_installed()
    except SlurmUnavailable as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    cluster = MultiNodeSlurmCluster(args.nodes, args.cpus_per_node)
    try:
        started = time.monotonic()
        cluster.start()
        nodes = ", ".join(f"{n} ({cluster.addr[n]})" for n in cluster.node_names)
        print(
            f"{args.nodes} node(s) idle after {time.monotonic() - started:.1f} s: {nodes}; slurmctld on hub "
            f"({cluster.hub_addr}); files in {cluster.root}\n"
            "Slurm clients must run in the hub's network namespace. In another shell, as root:\n"
            f"  export SLURM_CONF={cluster.conf}\n"
            f"  {' '.join(cluster.client_prefix)} bash\n"
            f"  sinfo -N; srun -N {args.nodes} hostname; HPCGAN_NODES={args.nodes} slurm/pipeline.sh\n"
            "Ctrl-C here stops the cluster and removes its namespaces.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    main()
