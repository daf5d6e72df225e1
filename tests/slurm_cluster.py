"""A real single-node Slurm cluster for the tests: Debian's munge, slurmctld, slurmd and
slurmdbd (job states for submitit) on a private MariaDB, all from installed packages,
with their configuration, state and logs in one temporary folder, stopped by PID. Each
cluster has its own munged (socket and key), so that clusters started at once by several
test sessions never share, or stop, one another's daemons.

Nothing is installed here (`.ci/run` installs the packages); where a program is missing
or the cluster does not come up, :func:`start` raises :class:`Unavailable` with the
reason and the tests that need it skip. The settings are those of ../shared/cluster.md:
no cgroups, fast requeue, accounting through slurmdbd.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PROGRAMS = ("munged", "munge", "unmunge", "mungekey", "mariadb", "slurmctld", "slurmd",
            "slurmdbd", "mariadbd", "mariadb-install-db", "sbatch", "sinfo", "sacct", "scancel")
START_S = 60  # the most each daemon is given to come up
DB_USER = "slurm"


class Unavailable(RuntimeError):
    """The cluster cannot start here; the message says why (the tests skip with it)."""


@dataclass
class Cluster:
    """A running cluster: ``env`` points Slurm's commands at its configuration."""

    root: Path
    env: dict[str, str]
    pid_files: list[Path] = field(default_factory=list)
    children: dict[Path, subprocess.Popen] = field(default_factory=dict)  # not daemonized
    munge: Path | None = None  # this cluster's munged: socket, key, PID file and log

    def run(self, *command: str) -> str:
        return subprocess.run(command, env=self.env, check=True, capture_output=True,
                              text=True, timeout=60).stdout

    def stop(self) -> None:
        """Cancel the jobs left, then end each daemon this cluster started, newest first."""
        with contextlib.suppress(Exception):
            self.run("scancel", "-u", os.environ.get("USER", "root"))
        for pid_file in reversed(self.pid_files):
            child = self.children.get(pid_file)
            if child is None:
                _stop(pid_file)
                continue
            child.terminate()
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        if self.munge is not None:
            shutil.rmtree(self.munge, ignore_errors=True)


def _which(program: str) -> str | None:
    return shutil.which(program) or shutil.which(program, path="/usr/sbin:/sbin")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pid(pid_file: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(pid_file.read_text().split()[0])
    return None


def _stop(pid_file: Path, wait_s: float = 20.0) -> None:
    pid = _pid(pid_file)
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _wait(what: str, ready, log: Path | None = None) -> None:
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-600:] if log and log.exists() else ""
    raise Unavailable(f"{what} did not come up in {START_S} s {tail!r}")


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start(root: Path) -> Cluster:
    """Start the cluster under ``root``; raises Unavailable (and stops what it started)."""
    missing = [p for p in PROGRAMS if _which(p) is None]
    if missing:
        raise Unavailable(f"Slurm is not installed here ({', '.join(missing)} missing; "
                          "`.ci/run` installs Debian's slurmctld slurmd slurm-client munge "
                          "slurmdbd mariadb-server)")
    if os.geteuid() != 0:
        raise Unavailable("the test Slurm cluster runs its daemons as root")
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    cluster = Cluster(root, env)
    try:
        _start_munge(cluster)
        _start_mariadb(cluster)
        _start_slurm(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _start_munge(cluster: Cluster) -> None:
    """This cluster's own munged (cluster.md, steps 1-2, on a private socket and key), so
    that clusters started at once (test sessions, benchmarks) never stop each other's.
    munged wants every folder above its socket open to all (o+x), which pytest's 0700
    temporary folders are not: the socket's folder is a fresh one under /tmp."""
    folder = Path(tempfile.mkdtemp(prefix="ccat-munge-"))
    folder.chmod(0o755)
    cluster.munge = folder
    socket_path, pid_file = folder / "munge.socket", folder / "munged.pid"
    subprocess.run([_which("mungekey"), "--create", f"--keyfile={folder / 'munge.key'}"],
                   check=True, capture_output=True, timeout=30)
    subprocess.run([_which("munged"), f"--socket={socket_path}",
                    f"--key-file={folder / 'munge.key'}", f"--pid-file={pid_file}",
                    f"--log-file={folder / 'munged.log'}", f"--seed-file={folder / 'munged.seed'}"],
                   check=True, capture_output=True, timeout=30)
    cluster.pid_files.append(pid_file)

    def answers() -> bool:
        encoded = subprocess.run(["munge", "-n", f"--socket={socket_path}"],
                                 capture_output=True, timeout=10)
        return encoded.returncode == 0 and subprocess.run(
            ["unmunge", f"--socket={socket_path}"], input=encoded.stdout, capture_output=True,
            timeout=10).returncode == 0

    _wait("munged", answers, folder / "munged.log")


def _start_mariadb(cluster: Cluster) -> None:
    """A private MariaDB on a free port, its data under the cluster's folder."""
    root, data = cluster.root, cluster.root / "db"
    port = _free_port()
    if not data.is_dir():
        subprocess.run([_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}",
                        "--user=root", "--auth-root-authentication-method=normal",
                        "--skip-test-db"], check=True, capture_output=True, timeout=120)
    pid_file, sock = root / "mariadb.pid", root / "mariadb.sock"
    cluster.children[pid_file] = subprocess.Popen([_which("mariadbd"), "--no-defaults", f"--datadir={data}", "--user=root",
                      f"--port={port}", "--bind-address=127.0.0.1", f"--socket={sock}",
                      f"--pid-file={pid_file}", f"--log-error={root / 'mariadb.log'}",
                      "--skip-log-bin"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    cluster.pid_files.append(pid_file)
    _wait("mariadb", lambda: pid_file.exists() and sock.exists(), root / "mariadb.log")
    grant = (f"CREATE USER IF NOT EXISTS '{DB_USER}'@'127.0.0.1' IDENTIFIED BY '{DB_USER}'; "
             f"GRANT ALL ON *.* TO '{DB_USER}'@'127.0.0.1'; FLUSH PRIVILEGES;")
    subprocess.run(["mariadb", f"--socket={sock}", "-u", "root", "-e", grant], check=True,
                   capture_output=True, timeout=30)
    cluster.env["CCAT_TEST_DB_PORT"] = str(port)


def _start_slurm(cluster: Cluster) -> None:
    """slurmdbd, slurmctld and slurmd (cluster.md, steps 3-5) with accounting."""
    root, host = cluster.root, socket.gethostname().split(".")[0]
    ports = {name: _free_port() for name in ("dbd", "ctld", "d")}
    (root / "state").mkdir(exist_ok=True)
    (root / "spool").mkdir(exist_ok=True)
    dbd = root / "slurmdbd.conf"
    auth = f"socket={cluster.munge / 'munge.socket'}"
    dbd.write_text("\n".join([
        "AuthType=auth/munge", f"AuthInfo={auth}", "DbdHost=localhost",
        f"DbdPort={ports['dbd']}", "SlurmUser=root",
        f"PidFile={root / 'slurmdbd.pid'}", f"LogFile={root / 'slurmdbd.log'}",
        "StorageType=accounting_storage/mysql", "StorageHost=127.0.0.1",
        f"StoragePort={cluster.env['CCAT_TEST_DB_PORT']}", f"StorageUser={DB_USER}",
        f"StoragePass={DB_USER}", "StorageLoc=slurm_acct_db", ""]))
    dbd.chmod(0o600)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    (root / "slurm.conf").write_text("\n".join([
        "ClusterName=ccattest", f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ports['ctld']}", f"SlurmdPort={ports['d']}",
        "AuthType=auth/munge", f"AuthInfo=cred_expire=10,{auth}", "CredType=cred/munge",
        "SlurmUser=root", "SlurmdUser=root", "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none", "MpiDefault=none",
        "SwitchType=switch/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "JobRequeue=1",
        "SchedulerParameters=sched_interval=2,bf_interval=5", "MailProg=/bin/true",
        "ReturnToService=2", "KillWait=5", "InactiveLimit=0", "MinJobAge=300",
        f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "AccountingStorageType=accounting_storage/slurmdbd",
        "AccountingStorageHost=localhost", f"AccountingStoragePort={ports['dbd']}",
        f"AccountingStoragePass={cluster.munge / 'munge.socket'}",  # munged for slurmdbd
        f"NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={memory} "
        "State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    daemons = [("slurmdbd", ports["dbd"]), ("slurmctld", ports["ctld"]), ("slurmd", ports["d"])]
    for name, port in daemons:
        log = root / f"{name}.log"
        subprocess.run([_which(name)], env=cluster.env, check=True, capture_output=True,
                       timeout=60)
        cluster.pid_files.append(root / f"{name}.pid")
        _wait(name, lambda port=port: _listening(port), log)
    _wait("the node", lambda: cluster.run("sinfo", "-h", "-o", "%t").strip() == "idle",
          root / "slurmd.log")
