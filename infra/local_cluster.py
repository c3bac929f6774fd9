"""A multi-node Ray cluster on one machine, started with the same `ray start` commands as a real one.

Each node gets its own ports and `--temp-dir`, so the cluster never collides with another local Ray
(a test session's `ray.init`, a colleague's run). Every process a node starts stays in the process
group of its `ray start`, which is how `stop()` ends exactly these processes: `ray stop` would end
every Ray process of this user on the machine, including ones this cluster does not own.

    python -m infra.local_cluster up --nodes 2       # prints the driver's environment; Ctrl-C stops it

Nodes and drivers authenticate with a token made for this cluster (Ray's token auth,
RAY_AUTH_MODE=token, as on a shared cluster). The token lives in a file readable by its owner only
(0600), named by RAY_AUTH_TOKEN_PATH, so it never appears in a process listing, a terminal or a
log; HTTP clients of the dashboard send it as `Authorization: Bearer <token>` (`auth_headers`),
and Ray's own clients (`ray.init`, `JobSubmissionClient`, `ray job submit`) read the file
themselves. Being explicit also keeps the cluster independent of a `~/.ray/auth_token` left on
the machine, which Ray 2.60's GCS otherwise enforces against clients that send none.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

# The ports `ray start` would otherwise take at fixed defaults, which two nodes on one host share.
_PORT_FLAGS = (
    "--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port", "--metrics-export-port", "--runtime-env-agent-port",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int, exclude: frozenset[int] = frozenset()) -> list[int]:
    """`count` distinct TCP ports on 127.0.0.1 that nothing listens on right now, none in `exclude`.
    Every socket stays bound until all are chosen: `free_port` called `count` times may get one
    port twice, since the OS can hand a released port out again at once."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        while len(ports) < count:
            s = stack.enter_context(socket.socket())
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port not in exclude:
                ports.append(port)
        return ports


@dataclass
class LocalNode:
    """One `ray start` on this machine: its temp dir and the process group it started."""

    temp_dir: Path
    pgid: int | None = None

    def processes(self) -> list[psutil.Process]:
        """Live processes of this node: its process group, or any process naming its temp dir."""
        found = []
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                in_group = self.pgid is not None and os.getpgid(proc.pid) == self.pgid
                names_dir = str(self.temp_dir) in " ".join(proc.info["cmdline"] or ())
            except (ProcessLookupError, psutil.Error):
                continue
            if (in_group or names_dir) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        return found


@dataclass
class LocalRayCluster:
    """A head plus `num_nodes - 1` worker nodes, `cpus_per_node` logical CPUs each (`head_cpus`
    on the head when given: it also runs the driver and Ray Data's read tasks).

    `address` (host:port of the head's GCS) is what a driver passes as RAY_ADDRESS.
    `dashboard_port` None leaves the dashboard off; it listens on 127.0.0.1 only.
    `node_env` is added to every node's environment (and so to every Ray worker process), as a
    cluster's pods get theirs from ConfigMaps and Secrets.
    """

    num_nodes: int = 2
    cpus_per_node: int = 1
    dashboard_port: int | None = None
    head_cpus: int | None = None
    root: Path | None = None
    node_env: dict[str, str] = field(default_factory=dict, repr=False)
    nodes: list[LocalNode] = field(default_factory=list)
    address: str = ""
    auth_token: str = field(default_factory=lambda: secrets.token_hex(32), repr=False)
    token_path: Path | None = None
    _owns_root: bool = field(default=False, repr=False)

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard / Jobs API / Serve REST API, or None when the dashboard is off."""
        if self.dashboard_port is None:
            return None
        return f"http://{self.address.split(':')[0]}:{self.dashboard_port}"

    def driver_env(self) -> dict[str, str]:
        """What a driver (CLI, script, RayJob-like entrypoint) adds to its environment to use us."""
        return {"RAY_ADDRESS": self.address, **self._auth_env()}

    def auth_headers(self) -> dict[str, str]:
        """The header an HTTP client of the dashboard (Jobs, Serve REST API) sends."""
        return {"Authorization": f"Bearer {self.auth_token}"}

    def _auth_env(self) -> dict[str, str]:
        if self.token_path is None:
            raise RuntimeError("the cluster has not been started: its token file does not exist yet")
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0"}

    def _write_token(self) -> None:
        """The token in a file that only its owner can read (O_EXCL: never an existing file)."""
        self.token_path = self.root / "auth_token"
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.auth_token)

    def start(self, timeout_s: float = 120.0) -> str:
        if self.num_nodes < 1:
            raise ValueError(f"num_nodes must be >= 1, got {self.num_nodes}")
        # Unix socket paths must stay under 108 bytes: a short root under /tmp keeps them there.
        self._owns_root = self.root is None
        self.root = Path(self.root or tempfile.mkdtemp(prefix="rayc", dir="/tmp"))
        self.address = f"127.0.0.1:{free_port()}"
        self._write_token()
        try:
            self._start_node(head=True, timeout_s=timeout_s)
            for _ in range(self.num_nodes - 1):
                self._start_node(head=False, timeout_s=timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.info("local Ray cluster of %d nodes at %s", self.num_nodes, self.address)
        return self.address

    def _start_node(self, *, head: bool, timeout_s: float) -> None:
        node = LocalNode(temp_dir=self.root / f"n{len(self.nodes)}")
        node.temp_dir.mkdir(parents=True)
        self.nodes.append(node)
        cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", *self._node_args(node, head)]
        log_path = node.temp_dir / "ray_start.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env=self._node_env())
        node.pgid = proc.pid
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            raise RuntimeError(f"ray start failed (rc={rc}): {log_path.read_text()[-3000:]}")

    def _num_cpus(self, head: bool) -> int:
        return self.head_cpus if head and self.head_cpus is not None else self.cpus_per_node

    def _node_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        return {**env, **self.node_env, **self._auth_env()}

    def _node_args(self, node: LocalNode, head: bool) -> list[str]:
        args = [
            "--num-cpus", str(self._num_cpus(head)), "--num-gpus", "0",
            "--temp-dir", str(node.temp_dir), "--disable-usage-stats",
            "--node-ip-address", "127.0.0.1",
        ]
        host, port = self.address.split(":")
        taken = frozenset(p for p in (int(port), self.dashboard_port) if p is not None)
        ports = iter(free_ports(len(_PORT_FLAGS) + 2, exclude=taken))
        for flag in _PORT_FLAGS:
            args += [flag, str(next(ports))]
        if not head:
            return [*args, "--address", self.address]
        args += ["--head", "--port", port, "--ray-client-server-port", str(next(ports))]
        if self.dashboard_port is None:
            # A free port even so: `ray start` still checks its dashboard port, and the default
            # 8265 may belong to another Ray on this machine.
            return [*args, "--include-dashboard=false", "--dashboard-port", str(next(ports))]
        return [*args, "--include-dashboard=true", "--dashboard-host", host,
                "--dashboard-port", str(self.dashboard_port)]

    def processes(self) -> list[psutil.Process]:
        return [p for node in self.nodes for p in node.processes()]

    def stop(self, grace_s: float = 3.0) -> None:
        """Terminate every process of every node (workers first), then kill what is left; remove
        the token file, and the whole root when the cluster made it.

        raylet and gcs_server can take longer than a rehearsal is worth to exit on SIGTERM; the
        cluster is disposable, so after `grace_s` the rest is killed.
        """
        for node in reversed(self.nodes):
            _signal_all(node.processes(), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.processes() and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_all(self.processes(), signal.SIGKILL)
        psutil.wait_procs(self.processes(), timeout=5)
        if self.root is not None and self._owns_root:
            shutil.rmtree(self.root, ignore_errors=True)
        elif self.token_path is not None:
            self.token_path.unlink(missing_ok=True)

    def __enter__(self) -> LocalRayCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_all(processes: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def interrupt_on_stop_signals() -> None:
    """Make Ctrl-C and SIGTERM raise KeyboardInterrupt, so that `with` blocks stop what they
    started. Python leaves SIGINT ignored in a process that started with it ignored (a background
    job of a non-interactive shell) and dies on SIGTERM without cleanup; both are handled here.
    After the first signal further ones are ignored: the cleanup that follows must finish, or its
    processes outlive it."""

    def interrupt(signum: int, frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        logger.info("stopping (signal %d)", signum)
        raise KeyboardInterrupt

    for sig in STOP_SIGNALS:
        signal.signal(sig, interrupt)


def serve_until_stopped() -> None:
    """Block until a stop signal (see interrupt_on_stop_signals)."""
    with contextlib.suppress(KeyboardInterrupt):
        signal.pause()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=1)
    parser.add_argument("--dashboard-port", type=int, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    interrupt_on_stop_signals()
    cluster = LocalRayCluster(args.nodes, args.cpus_per_node, args.dashboard_port)
    with cluster:
        # The token itself stays in its file: the exports name the file.
        for name, value in cluster.driver_env().items():
            print(f"export {name}={value}", flush=True)
        if cluster.dashboard_url:
            print(f"# dashboard: {cluster.dashboard_url} (Authorization: Bearer $(cat {cluster.token_path}))",
                  flush=True)
        serve_until_stopped()


if __name__ == "__main__":
    main()
