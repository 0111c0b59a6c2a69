"""A real SLURM cluster in a scratch folder, for the tests of slurm/train.sh: one node, or several nodes on this
one machine, each in a network namespace of its own (see `Cluster`).

Debian's slurmctld, slurmd and munge packages (`apt-get install slurmctld slurmd slurm-client munge`) cannot start
their services where there is no systemd, so this starts the three daemons itself, in the foreground, as child
processes with known PIDs: munged (as the munge user, on a socket of its own), slurmctld and one slurmd per node
(as root, with a generated slurm.conf whose every state, spool, log and PID path lies in the scratch folder). Clients
(sbatch, scontrol, scancel, and srun inside jobs) find it through the `SLURM_CONF` of `Cluster.env()`.

`stop()` cancels what is still queued, stops the daemons by PID, removes the namespaces, and reports any process
that still carries this cluster's SLURM_CONF in its environment (job steps, trainers, loader workers) and any
namespace or link it could not remove: a test fails on a leftover.

The slurm.conf lines that matter on such a machine are measured facts (../shared/ENVIRONMENT.md): the node's
CPUs/sockets/cores from `slurmd -C` and RealMemory no larger than it reports (more drains the node);
proctrack/linuxproc and task/none (no cgroups); cons_tres with CR_Core; EnforcePartLimits=ALL (an oversized job
is refused instead of pending forever); a short scheduler interval.

Run by hand to try the script against a cluster (stops it on Ctrl-C):
    .venv/bin/python tests/slurm/slurm_cluster.py /tmp/mycluster        # one node
    .venv/bin/python tests/slurm/slurm_cluster.py /tmp/mycluster 2      # two nodes in network namespaces
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
FAKE_GPUS = 2
INSTALL_HINT = "SLURM not installed: apt-get install slurmctld slurmd slurm-client munge"


def missing() -> str | None:
    """Why a cluster cannot be started here, or None."""
    for prog in (*DAEMONS, "sbatch", "scontrol", "scancel", "srun"):
        if shutil.which(prog) is None and not Path("/usr/sbin", prog).exists():
            return f"{INSTALL_HINT} ({prog} not found)"
    if os.geteuid() != 0:
        return "the SLURM tests start slurmd as root (it launches jobs as their user); run them as root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no munge user (the munge package creates it)"
    if not Path("/etc/munge/munge.key").is_file():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return None


def _exe(prog: str) -> str:
    return shutil.which(prog) or str(Path("/usr/sbin", prog))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_hardware() -> dict[str, str]:
    """`slurmd -C`'s description of this machine: CPUs, Boards, SocketsPerBoard, ..., RealMemory."""
    out = subprocess.run([_exe("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    first = out.splitlines()[0]
    return dict(re.findall(r"(\w+)=(\S+)", first))


class Cluster:
    """`Cluster(folder).start()`: one node, `localhost`, on 127.0.0.1.

    `Cluster(folder, netns_nodes=2).start()`: nodes n1, n2, ... each in a network namespace of its own (made
    here, removed by stop()), joined by a bridge that also carries the controller's address in the host's
    namespace. Each node's slurmd also gets its own hostname (UTS namespace) and an /etc/hosts naming every node
    (bind-mounted in a mount namespace of its own: the host's /etc is untouched), so torchrun's and gloo's
    address lookups on a node find that node's address, as on a real cluster. Clients run in the host's namespace.
    """

    SUBNET = "10.213.77"  # .1, .2, ...: the nodes; .254: the controller (the host's end of the bridge)

    def __init__(self, folder: Path, netns_nodes: int = 0):
        self.dir = Path(folder)
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.munge_dir: Path | None = None
        self._log = None
        tag = f"dg{os.getpid() % 100000}"  # interface names: at most 15 characters
        if netns_nodes:
            self.nodes = {f"n{i}": f"{self.SUBNET}.{i}" for i in range(1, netns_nodes + 1)}
            self.netns = {name: f"{tag}-{name}" for name in self.nodes}
            self.bridge = f"{tag}br"
            self.controller = (socket.gethostname(), f"{self.SUBNET}.254")
        else:
            self.nodes, self.netns, self.bridge = {"localhost": "127.0.0.1"}, {}, None
            self.controller = ("localhost", "127.0.0.1")
        self._made_links: list[str] = []

    @property
    def nodename(self) -> str:
        return next(iter(self.nodes))

    # ------------------------------------------------------------------ starting
    def start(self, timeout: float = 60) -> Cluster:
        self.dir.mkdir(parents=True, exist_ok=True)
        for sub in ("state", *(f"spool/{name}" for name in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        # The daemons' own output (munged's included) goes to one file; their logs are in the scratch folder too.
        self._log = log = open(self.dir / "daemons.out", "ab")  # noqa: SIM115 (open while the daemons run)
        try:
            if self.netns:
                self._make_network()
            self._start_munge(log)
            self._write_conf()
            env = self.env()
            # -D: foreground, so the PID we hold is the daemon's; -i: ignore any state from an earlier run.
            self.procs["slurmctld"] = subprocess.Popen(
                [_exe("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=env, stdout=log, stderr=log
            )
            self._wait(lambda: "UP" in self._scontrol("ping").stdout, timeout, "slurmctld to answer `scontrol ping`")
            for name in self.nodes:
                cmd = [_exe("slurmd"), "-D", "-N", name, "-f", str(self.conf)]
                if name in self.netns:
                    cmd = [*self._in_node(name), *cmd]
                self.procs[f"slurmd {name}"] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
            for name in self.nodes:
                self._wait(lambda n=name: self._node_idle(n), timeout, f"node {name} to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _make_network(self) -> None:
        """A bridge on the host (the controller's address), one namespace per node with a veth into the bridge."""

        def ip(*args: str, ns: str | None = None) -> None:
            cmd = ["ip", *(("-n", ns) if ns else ()), *args]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"SLURM test cluster: `{' '.join(cmd)}` failed: {p.stderr.strip()}")

        ip("link", "add", self.bridge, "type", "bridge")
        self._made_links.append(self.bridge)
        ip("addr", "add", f"{self.controller[1]}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{addr} {name}\n" for name, addr in self.nodes.items())
        hosts += f"{self.controller[1]} {self.controller[0]}\n"
        for i, (name, addr) in enumerate(self.nodes.items(), 1):
            ns, outside = self.netns[name], f"{self.bridge[:-2]}v{i}"
            ip("netns", "add", ns)
            self._made_links.append(f"netns:{ns}")
            ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            ip("link", "set", outside, "master", self.bridge, "up")
            ip("addr", "add", f"{addr}/24", "dev", "eth0", ns=ns)
            ip("link", "set", "eth0", "up", ns=ns)
            ip("link", "set", "lo", "up", ns=ns)
            (self.dir / f"hosts-{name}").write_text(hosts)

    def _in_node(self, name: str) -> list[str]:
        """The command prefix that runs a program "on" node `name`: its network, its hostname, its /etc/hosts."""
        # nsenter rather than `ip netns exec`, which remounts /sys: slurmd then finds no /sys/fs/cgroup and exits.
        script = 'mount --bind "$1" /etc/hosts && hostname "$2" && shift 2 && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.netns[name]}", "unshare", "--uts", "--mount", "--",
                "sh", "-c", script, "sh", str(self.dir / f"hosts-{name}"), name]  # fmt: skip

    def _start_munge(self, log) -> None:
        """munged on a socket in a folder of its own (nothing under /run is touched), as the munge user.

        munged wants a socket folder everyone can enter but only it (or root) can write, under parents that are
        root's or sticky, so the folder is made under /tmp (the pytest tmp folders are 0700 root's)."""
        user = pwd.getpwnam("munge")
        self.munge_dir = Path(tempfile.mkdtemp(prefix="distgan-munge-"))
        os.chown(self.munge_dir, user.pw_uid, user.pw_gid)
        os.chmod(self.munge_dir, 0o755)
        d = self.munge_dir
        cmd = [
            "runuser", "-u", "munge", "--", _exe("munged"), "--foreground", f"--socket={d / 'munge.socket'}",
            f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}",
        ]  # fmt: skip
        # A process group of its own, so stop() reaches munged itself and not only runuser.
        self.procs["munged"] = subprocess.Popen(cmd, start_new_session=True, stdout=log, stderr=log)
        self._wait(lambda: (d / "munge.socket").exists(), 20, "munged's socket")

    def _write_conf(self) -> None:
        hw = node_hardware()
        d = self.dir
        node = " ".join(
            f"{k}={hw[k]}" for k in ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore") if k in hw
        )
        memory = max(1, int(hw.get("RealMemory", "1000")) - 256)  # at most what slurmd reports, else it drains
        lines = f"""
            ClusterName=distgantest
            SlurmctldHost={self.controller[0]}({self.controller[1]})
            SlurmctldPort={free_port()}
            SlurmdPort={free_port()}
            SlurmUser=root
            SlurmdUser=root
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge_dir / "munge.socket"}
            StateSaveLocation={d / "state"}
            SlurmdSpoolDir={d / "spool" / "%n"}
            SlurmctldPidFile={d / "slurmctld.pid"}
            SlurmdPidFile={d / "slurmd-%n.pid"}
            SlurmctldLogFile={d / "slurmctld.log"}
            SlurmdLogFile={d / "slurmd-%n.log"}
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_Core
            SchedulerType=sched/backfill
            SchedulerParameters=sched_interval=2,bf_interval=2
            EnforcePartLimits=ALL
            MailProg=/bin/true
            ReturnToService=2
            MinJobAge=600
            KillWait=30
            InactiveLimit=0
            SlurmctldTimeout=30
            SlurmdTimeout=60
            JobCompType=jobcomp/none
            AccountingStorageType=accounting_storage/none
            GresTypes=gpu
            PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
        """
        for name, addr in self.nodes.items():
            lines += f"NodeName={name} NodeAddr={addr} {node} RealMemory={memory} Gres=gpu:{FAKE_GPUS} State=UNKNOWN\n"
        self.conf.write_text("\n".join(line.strip() for line in lines.strip().splitlines()) + "\n")
        # GPUs that do not exist, so that jobs can ask for them and see what SLURM tells a job about its GPUs
        # (SLURM_GPUS_ON_NODE, CUDA_VISIBLE_DEVICES). 22.05 rejects count-only GPUs: File= must name files.
        for i in range(FAKE_GPUS):
            (d / f"fake-gpu{i}").touch()
        (d / "gres.conf").write_text(f"Name=gpu File={d / 'fake-gpu'}[0-{FAKE_GPUS - 1}]\n")

    def env(self, **extra: str) -> dict[str, str]:
        """os.environ plus SLURM_CONF (for sbatch/scontrol/srun); no SLURM_* of an enclosing job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    # ------------------------------------------------------------------ asking
    def _scontrol(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_exe("scontrol"), *args], env=self.env(), capture_output=True, text=True, timeout=30)

    def scontrol(self, *args: str) -> str:
        p = self._scontrol(*args)
        if p.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)} failed: {p.stderr.strip()}")
        return p.stdout

    def job(self, job_id: int | str) -> dict[str, str]:
        """`scontrol show job -o` as a dict (JobState, Restarts, ExitCode, StdOut, ...)."""
        return dict(re.findall(r"(\w+)=(\S*)", self.scontrol("show", "job", "-o", str(job_id))))

    def start_now(self, job_id: int | str) -> None:
        """Lift the hold SLURM puts on a requeued job (`StartTime=now`). The scheduler may start the job between
        the caller's look at its state and this update ("Job is no longer pending execution"): that is the wanted
        outcome, not an error; any other failure, or one while the job is still pending, is."""
        p = self._scontrol("update", f"JobId={job_id}", "StartTime=now")
        if p.returncode != 0 and self.job(job_id)["JobState"] == "PENDING":
            raise RuntimeError(f"scontrol update JobId={job_id} StartTime=now failed: {p.stderr.strip()}")

    def _node_idle(self, name: str) -> bool:
        p = self._scontrol("show", "node", "-o", name)
        return p.returncode == 0 and bool(re.search(r"State=IDLE\b", p.stdout))

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while not ok():
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:.0f} s"
                raise RuntimeError(f"SLURM test cluster: waiting for {what}: {why}\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, chars: int = 3000) -> str:
        out = []
        munge_log = [self.munge_dir / "munged.log"] if self.munge_dir else []
        for path in [*sorted(self.dir.glob("*.log")), *munge_log, self.dir / "daemons.out"]:
            if path.is_file():
                out.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)

    # ------------------------------------------------------------------ stopping
    def leftovers(self) -> dict[int, str]:
        """pid -> command line of every live process whose environment names this cluster's slurm.conf."""
        needle = f"SLURM_CONF={self.conf}".encode()
        found = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                if needle not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                    continue
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError):
                continue
            if state != "Z":
                found[int(entry)] = cmd.strip()
        return found

    def stop(self) -> list[str]:
        """Cancel every job, stop the daemons by PID, remove the network; returns what was left after that
        (processes of the cluster, which it then kills, and network namespaces or links it could not remove)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            subprocess.run([_exe("scancel"), "--full", "--user=root"], env=self.env(), capture_output=True, timeout=30)
            deadline = time.time() + 40  # KillWait is 30 s: a cancelled job's processes are gone by then
            while time.time() < deadline and any(" slurmstepd" in f" {c}" for c in self.leftovers().values()):
                time.sleep(0.5)
        for name in [*(n for n in self.procs if n.startswith("slurmd")), "slurmctld"]:
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)
        found = self.leftovers()
        left = [f"pid {pid}: {cmd}" for pid, cmd in found.items()]
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        munged = self.procs.get("munged")
        if munged is not None and munged.poll() is None:
            os.killpg(munged.pid, signal.SIGTERM)  # runuser and munged
            try:
                munged.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(munged.pid, signal.SIGKILL)
                munged.wait(10)
        if self.munge_dir is not None:
            shutil.rmtree(self.munge_dir, ignore_errors=True)
        for link in reversed(self._made_links):  # a namespace takes its end of the veth with it
            kind, _, name = link.rpartition(":")
            cmd = ["ip", "netns", "del", name] if kind == "netns" else ["ip", "link", "del", name]
            subprocess.run(cmd, capture_output=True)
        if self._made_links:
            listed = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
            listed += subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
            left += [f"network {link}" for link in self._made_links if link.rpartition(":")[2] in listed]
        self._made_links = []
        if self._log is not None:
            self._log.close()
            self._log = None
        self.procs = {}
        return left


if __name__ == "__main__":
    import sys

    if len(sys.argv) not in (2, 3):
        sys.exit(f"usage: {sys.argv[0]} FOLDER [NODES]   (starts a test cluster there, NODES > 0: in network "
                 "namespaces; Ctrl-C stops it)")  # fmt: skip
    why = missing()
    if why:
        sys.exit(why)
    cluster = Cluster(Path(sys.argv[1]).resolve(), netns_nodes=int(sys.argv[2]) if len(sys.argv) == 3 else 0)
    cluster.start()
    print(f"SLURM test cluster up ({', '.join(cluster.nodes)}): export SLURM_CONF={cluster.conf}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while all(p.poll() is None for p in cluster.procs.values()):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        left = cluster.stop()
        print(f"stopped; leftovers killed: {left}" if left else "stopped, nothing left behind")
