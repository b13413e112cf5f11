"""A throwaway single-node Slurm cluster on 127.0.0.1, for the tests and for trying the cluster path:
munge (reused when a munged already answers on its default socket), MariaDB with slurmdbd (submitit
reads job states with sacct), slurmctld and slurmd, with their own config folder, state folders
and free ports, so they never meet a Slurm already on the machine.

    python -m mnist_logreg.services.slurm          # prints the export SLURM_CONF=... line; Ctrl-C stops it

Debian's packages: slurm-wlm slurmdbd mariadb-server munge (Slurm 22.05). No systemd is needed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .tracking import free_port

PACKAGES = "slurm-wlm slurmdbd mariadb-server munge"
BINARIES = ("slurmctld", "slurmd", "slurmdbd", "munged", "mariadbd", "mariadb-install-db", "sbatch", "sacct")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")
CLUSTER = "mnistlr"
PARTITION = "debug"


def missing() -> str | None:
    """Why a throwaway cluster cannot start here (a one-line reason), or None."""
    absent = [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]
    if absent:
        return f"Slurm is not installed ({', '.join(absent)} missing): apt-get install {PACKAGES}"
    if os.geteuid() != 0:
        return "the throwaway Slurm cluster runs its daemons as root (SlurmUser=root)"
    return None


def _binary(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _wait(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.1)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class SlurmCluster:
    """Start with `with SlurmCluster() as cluster:`; cluster.env holds SLURM_CONF for the commands."""

    def __init__(self, folder: Path | None = None, cpus: int | None = None, memory_mb: int | None = None) -> None:
        self.folder = Path(folder or tempfile.mkdtemp(prefix="mnist_logreg_slurm_"))
        self.cpus = cpus or os.cpu_count() or 1
        self.memory_mb = memory_mb or _memory_mb()
        self.node = "node1"
        self.procs: list[subprocess.Popen] = []
        self.conf = self.folder / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    # -- the parts --------------------------------------------------------------------------------
    def _munge(self) -> None:
        """munged on its default socket: Slurm's accounting connection uses it whatever AuthInfo says."""
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # one answers already; it is not ours to stop
        MUNGE_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_SOCKET.parent, "munge", "munge")
        self._start([_binary("munged"), "--foreground", "--force"], "munged", user="munge")
        _wait(lambda: subprocess.run(["munge", "-n"], capture_output=True).returncode == 0, "munged")

    def _mariadb(self) -> int:
        data, port = self.folder / "mysql", free_port()
        subprocess.run([_binary("mariadb-install-db"), f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)
        self._start([_binary("mariadbd"), "--no-defaults", f"--datadir={data}", f"--socket={data}/mysqld.sock",
                     f"--port={port}", "--bind-address=127.0.0.1", "--user=root", "--skip-grant-tables",
                     f"--pid-file={data}/mariadb.pid", "--innodb-buffer-pool-size=32M"], "mariadb")
        _wait(lambda: _answers(port), "MariaDB")
        return port

    def _write_configs(self, db_port: int) -> tuple[int, int, int]:
        etc, state = self.folder / "etc", self.folder / "state"
        for sub in (etc, state / "ctld", state / "d", self.folder / "log", self.folder / "cgroup"):
            sub.mkdir(parents=True, exist_ok=True)
        dbd_port, ctld_port, d_port = free_port(), free_port(), free_port()
        dbd = etc / "slurmdbd.conf"
        dbd.write_text(f"""AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={dbd_port}
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={db_port}
StorageUser=root
StoragePass=none
StorageLoc=slurm_acct_db
PidFile={state}/slurmdbd.pid
LogFile={self.folder}/log/slurmdbd.log
""")
        dbd.chmod(0o600)
        (etc / "cgroup.conf").write_text(f"CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n"
                                         f"CgroupMountpoint={self.folder}/cgroup\n")
        self.conf.write_text(f"""ClusterName={CLUSTER}
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/d
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={self.folder}/log/slurmctld.log
SlurmdLogFile={self.folder}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={dbd_port}
JobCompType=jobcomp/none
KillWait=2
MinJobAge=300
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
MessageTimeout=10
NodeName={self.node} NodeAddr=127.0.0.1 NodeHostname={socket.gethostname()} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        return dbd_port, ctld_port, d_port

    def start(self) -> "SlurmCluster":
        why = missing()
        if why:
            raise RuntimeError(why)
        try:
            self._munge()
            db_port = self._mariadb()
            dbd_port, ctld_port, _ = self._write_configs(db_port)
            self._start([_binary("slurmdbd"), "-D"], "slurmdbd")
            _wait(lambda: _answers(dbd_port), "slurmdbd")
            subprocess.run(["sacctmgr", "-i", "add", "cluster", CLUSTER], env=self.env, capture_output=True, check=True)
            self._start([_binary("slurmctld"), "-D", "-i"], "slurmctld")
            _wait(lambda: _answers(ctld_port), "slurmctld")
            self._start([_binary("slurmd"), "-D", "-N", self.node], "slurmd")
            _wait(self._node_idle, "slurmd", timeout=60)
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip().startswith("idle")

    def _start(self, cmd: list[str], name: str, user: str | None = None) -> None:
        log = open(self.folder / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env={**self.env, "SLURM_CONF": str(self.conf)}, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True, user=user))

    def stop(self) -> None:
        """Cancel every job, then stop every daemon this cluster started, newest first."""
        if self.procs:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        total_kb = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
    return max(1024, total_kb // 1024 - 1024)


def main() -> int:
    why = missing()
    if why:
        print(f"Error: {why}", file=sys.stderr)
        return 2
    with SlurmCluster() as cluster:
        print(f"a single-node Slurm cluster is up ({cluster.cpus} CPUs, {cluster.memory_mb} MB, partition "
              f"{PARTITION}); in another shell:\n  export SLURM_CONF={cluster.conf}\nCtrl-C stops it.", flush=True)
        try:
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    sys.exit(main())
