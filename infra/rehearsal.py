"""The production stack on one machine, every service real and on loopback, for the rehearsal.

What the cluster runs, started here as the operators of a cluster would start it:

- PostgreSQL (the system's package), as an unprivileged user on a temp data dir: MLflow's stores.
- An S3-compatible object store (moto in server mode): MLflow's artifacts, as MinIO in compose.
- `mlflow server` on PostgreSQL with served artifacts on S3 and basic authentication.
- `prefect server` (SQLite in its own home), a `prefect worker` of the project's process pool, and
  the deployments of prefect.yaml registered with `prefect deploy --all` (schedules paused).
- Ray: a head and worker nodes from `ray start`, token authentication on (infra/local_cluster.py).

Each service is a context manager whose `start()` returns a handle: URLs, the environment a
client adds, credentials (kept out of repr), and `startup_s`, the seconds it took to answer.
`Rehearsal` starts them all in dependency order. Every process runs in its own process group and
`stop()` ends that group, so nothing outlives the stack; temp dirs are removed.

    python -m infra.rehearsal up      # (infra/rehearse.sh) start it all, print the URLs; Ctrl-C stops
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from infra.local_cluster import LocalRayCluster, free_port, interrupt_on_stop_signals, serve_until_stopped

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
POSTGRES_USER = "postgres"  # the system account that Debian's postgresql package creates
WORK_POOL = "diffusion-pool"  # prefect.yaml's deployments run on this pool
S3_REGION = "us-east-1"


# ---------------------------------------------------------------- processes


class ServiceProcess:
    """One long-running server in a process group of its own, its output in `log_path`."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, env: dict[str, str] | None = None,
                 user: str | None = None, cwd: Path | None = None) -> None:
        self.name, self.log_path = name, log_path
        self._log: IO[bytes] = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        kwargs: dict[str, Any] = {}
        if user is not None:
            account = pwd.getpwnam(user)
            kwargs = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     start_new_session=True, **kwargs)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def stop(self, sig: signal.Signals = signal.SIGTERM, grace_s: float = 15.0) -> None:
        """`sig` to the whole group, SIGKILL to what is left after `grace_s`."""
        started = time.monotonic()
        for signum, wait_s in ((sig, grace_s), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signum)
            deadline = time.monotonic() + wait_s
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self.group_alive():
                break
            logger.warning("%s ignored %s for %.0f s: killed", self.name, signal.Signals(signum).name, wait_s)
        self._log.close()
        logger.info("%s stopped in %.1f s", self.name, time.monotonic() - started)

    def group_alive(self) -> bool:
        self.proc.poll()  # reap the leader: a zombie would keep its group "alive"
        try:
            os.killpg(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        return True


def wait_until(ready: Callable[[], bool], service: ServiceProcess, timeout_s: float) -> None:
    """Poll `ready` until it holds; fail at once, with the log, if the server exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not service.alive():
            raise RuntimeError(f"{service.name} exited during start-up:\n{service.log_tail()}")
        with contextlib.suppress(Exception):
            if ready():
                return
        time.sleep(0.25)
    raise TimeoutError(f"{service.name} did not answer within {timeout_s:.0f} s:\n{service.log_tail()}")


def _http_ok(url: str, **kwargs: Any) -> bool:
    import httpx

    return httpx.get(url, timeout=2, **kwargs).status_code == 200


def _console_script(name: str) -> str:
    """A console script installed beside this interpreter (the venv need not be activated)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} is not installed beside {sys.executable} nor on PATH")
    return found


def _private_file(path: Path, text: str, owner: str | None = None) -> Path:
    """`text` in a new file readable by its owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    if owner is not None:
        account = pwd.getpwnam(owner)
        os.chown(path, account.pw_uid, account.pw_gid)
    return path


def _clean_env(*overrides: dict[str, str]) -> dict[str, str]:
    """This process's environment without settings that would point a server elsewhere, then
    `overrides` in order."""
    prefixes = ("RAY_ADDRESS", "RAY_AUTH", "MLFLOW_", "PREFECT_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    for extra in overrides:
        env.update(extra)
    return env


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path:
    """Where the server's programs are: on PATH, else Debian's /usr/lib/postgresql/<major>/bin."""
    on_path = shutil.which("pg_ctl")
    if on_path:
        return Path(on_path).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not candidates:
        raise FileNotFoundError("PostgreSQL is not installed: `apt-get install postgresql` (.ci/run does)")
    return candidates[-1].parent


class LocalService:
    """A service this module starts: one process group (`server`) and a temp folder (`root`) that
    `stop` ends and deletes. `stop_signal`: what asks the process to shut down cleanly."""

    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(self) -> None:
        self.root: Path | None = None
        self.server: ServiceProcess | None = None

    def alive(self) -> bool:
        return self.server is not None and self.server.group_alive()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(self.stop_signal)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class PostgresHandle:
    host: str
    port: int
    superuser: str
    superuser_password: str = field(repr=False)
    startup_s: float = 0.0

    def uri(self, database: str, user: str, password: str) -> str:
        """A SQLAlchemy URI for `database` as `user` (the password is URL-safe hex). The driver is
        explicit: SQLAlchemy 2.1 maps a bare `postgresql://` to psycopg 3, which MLflow lacks."""
        return f"postgresql+psycopg2://{user}:{password}@{self.host}:{self.port}/{database}"

    def connect(self, database: str = "postgres"):
        import psycopg2

        return psycopg2.connect(host=self.host, port=self.port, user=self.superuser,
                                password=self.superuser_password, dbname=database, connect_timeout=2)

    def create_database(self, name: str, owner: str, owner_password: str) -> str:
        """A new role `owner` (password login) owning a new database `name`; its URI."""
        from psycopg2 import sql

        conn = self.connect()
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(sql.Identifier(owner)),
                            [owner_password])
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name),
                                                                           sql.Identifier(owner)))
        finally:
            conn.close()
        return self.uri(name, owner, owner_password)


class LocalPostgres(LocalService):
    """A throwaway PostgreSQL server on 127.0.0.1: initdb on a temp dir, password auth only.

    PostgreSQL refuses to run as root; as root this runs it as the unprivileged `postgres`
    account of the system package, otherwise as the current user. No Unix socket: TCP on
    loopback with scram-sha-256 passwords, so no other local user gets in through `trust`.
    Durability is off (fsync, synchronous_commit): the data dies with the rehearsal anyway.
    """

    stop_signal = signal.SIGINT  # "fast" shutdown: disconnect clients, stop cleanly

    def start(self, timeout_s: float = 60.0) -> PostgresHandle:
        started = time.monotonic()
        user = POSTGRES_USER if os.geteuid() == 0 else None
        bin_dir = postgres_bin_dir()
        self.root = Path(tempfile.mkdtemp(prefix="pgreh", dir="/tmp"))
        if user is not None:
            account = pwd.getpwnam(user)
            os.chown(self.root, account.pw_uid, account.pw_gid)
        password = secrets.token_hex(24)
        pwfile = _private_file(self.root / "pwfile", password, owner=user)
        data = self.root / "data"
        initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "-A", "scram-sha-256",
                  f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync", "--no-instructions"]
        out = subprocess.run(initdb, capture_output=True, text=True, timeout=120,
                             **_as_user_kwargs(user))
        pwfile.unlink()
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed: {out.stdout[-1500:]}{out.stderr[-1500:]}")
        port = free_port()
        cmd = [str(bin_dir / "postgres"), "-D", str(data), "-h", LOOPBACK, "-p", str(port), "-k", "",
               "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        self.server = ServiceProcess("postgres", cmd, self.root / "server.log", user=user)
        handle = PostgresHandle(LOOPBACK, port, POSTGRES_USER, password)
        wait_until(lambda: handle.connect().close() is None, self.server, timeout_s)
        return PostgresHandle(LOOPBACK, port, POSTGRES_USER, password, time.monotonic() - started)


def _as_user_kwargs(user: str | None) -> dict[str, Any]:
    if user is None:
        return {}
    account = pwd.getpwnam(user)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


# ---------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Handle:
    endpoint_url: str
    bucket: str
    access_key_id: str = field(repr=False)
    secret_access_key: str = field(repr=False)
    region: str = S3_REGION
    startup_s: float = 0.0

    def client_env(self) -> dict[str, str]:
        """What an S3 client (boto3, pyarrow, MLflow's server) reads to reach this store."""
        return {"AWS_ACCESS_KEY_ID": self.access_key_id, "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
                "AWS_REGION": self.region, "AWS_DEFAULT_REGION": self.region,
                "AWS_ENDPOINT_URL": self.endpoint_url, "MLFLOW_S3_ENDPOINT_URL": self.endpoint_url,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key_id,
                            aws_secret_access_key=self.secret_access_key)


class LocalS3(LocalService):
    """moto's S3 in server mode on 127.0.0.1 with one bucket. It keeps objects in memory and
    accepts any key pair; the handle's random keys keep clients configured as for a real store."""

    def __init__(self, bucket: str = "rehearsal") -> None:
        self.bucket = bucket
        super().__init__()

    def start(self, timeout_s: float = 60.0) -> S3Handle:
        started = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="s3reh", dir="/tmp"))
        port = free_port()
        cmd = [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(port)]
        self.server = ServiceProcess("moto_server", cmd, self.root / "server.log", env=_clean_env())
        handle = S3Handle(f"http://{LOOPBACK}:{port}", self.bucket, secrets.token_hex(10),
                          secrets.token_hex(20))
        wait_until(lambda: _http_ok(f"{handle.endpoint_url}/moto-api/"), self.server, timeout_s)
        handle.client().create_bucket(Bucket=self.bucket)
        return S3Handle(handle.endpoint_url, self.bucket, handle.access_key_id, handle.secret_access_key,
                        startup_s=time.monotonic() - started)


# ---------------------------------------------------------------- MLflow


@dataclass(frozen=True)
class MlflowHandle:
    tracking_uri: str
    username: str
    password: str = field(repr=False)
    artifacts_destination: str = ""
    startup_s: float = 0.0

    def client_env(self) -> dict[str, str]:
        """What an MLflow client adds: the server and its basic-auth account (artifacts travel
        through the server, so clients need no S3 credentials for MLflow)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "MLFLOW_TRACKING_USERNAME": self.username,
                "MLFLOW_TRACKING_PASSWORD": self.password}


AUTH_CONFIG = """\
[mlflow]
default_permission = READ
database_uri = {database_uri}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
"""


class LocalMlflowServer(LocalService):
    """`mlflow server` as infra/compose wires it: PostgreSQL backend store, artifacts served from
    S3 (`--artifacts-destination`), basic auth with its users in a second database."""

    def __init__(self, postgres: PostgresHandle, s3: S3Handle, admin_username: str = "admin") -> None:
        self.postgres, self.s3, self.admin_username = postgres, s3, admin_username
        super().__init__()

    def start(self, timeout_s: float = 180.0) -> MlflowHandle:
        started = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="mlreh", dir="/tmp"))
        db_password = secrets.token_hex(16)
        backend_uri = self.postgres.create_database("mlflow", "mlflow", db_password)
        auth_uri = self.postgres.create_database("mlflow_auth", "mlflow_auth", secrets.token_hex(16))
        auth_config = _private_file(self.root / "basic_auth.ini", AUTH_CONFIG.format(database_uri=auth_uri))
        admin_password = secrets.token_hex(16)
        port = free_port()
        destination = f"s3://{self.s3.bucket}/mlflow-artifacts"
        env = _clean_env(self.s3.client_env(), {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            "MLFLOW_AUTH_ADMIN_USERNAME": self.admin_username,
            "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            # The backend URI travels in the environment, not argv: a process listing shows argv.
            "MLFLOW_BACKEND_STORE_URI": backend_uri,
        })
        cmd = [sys.executable, "-m", "mlflow", "server", "--artifacts-destination", destination,
               "--host", LOOPBACK, "--port", str(port), "--workers", "1", "--app-name", "basic-auth"]
        self.server = ServiceProcess("mlflow server", cmd, self.root / "server.log", env=env, cwd=self.root)
        uri = f"http://{LOOPBACK}:{port}"
        wait_until(lambda: _http_ok(f"{uri}/health"), self.server, timeout_s)
        return MlflowHandle(uri, self.admin_username, admin_password, destination,
                            time.monotonic() - started)


# ---------------------------------------------------------------- Prefect


@dataclass(frozen=True)
class PrefectHandle:
    api_url: str
    startup_s: float = 0.0

    def client_env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": self.api_url}


class LocalPrefectServer(LocalService):
    """`prefect server start` on 127.0.0.1 with its own home and SQLite database."""

    def start(self, timeout_s: float = 180.0) -> PrefectHandle:
        started = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="pfreh", dir="/tmp"))
        port = free_port()
        env = _clean_env({
            "PREFECT_HOME": str(self.root),
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.root / 'prefect.db'}",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
        })
        cmd = [_console_script("prefect"), "server", "start", "--host", LOOPBACK, "--port", str(port),
               "--no-ui", "--analytics-off"]
        self.server = ServiceProcess("prefect server", cmd, self.root / "server.log", env=env, cwd=self.root)
        api_url = f"http://{LOOPBACK}:{port}/api"
        wait_until(lambda: _http_ok(f"{api_url}/health"), self.server, timeout_s)
        return PrefectHandle(api_url, time.monotonic() - started)


@dataclass(frozen=True)
class PrefectWorkerHandle:
    pool: str
    name: str
    startup_s: float = 0.0


def pool_workers(api_url: str, pool: str) -> list[dict[str, Any]]:
    """The workers the Prefect API knows for `pool` (each has `name`, `status`, heartbeats)."""
    import httpx

    response = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=5)
    if response.status_code == 404:
        return []
    response.raise_for_status()
    return response.json()


class LocalPrefectWorker(LocalService):
    """`prefect worker start --type process` on `pool`: flow runs execute as subprocesses with
    `env` (the services' client settings, as the worker pod has them). Ready once the API lists it."""

    stop_signal = signal.SIGINT

    def __init__(self, prefect: PrefectHandle, env: dict[str, str], pool: str = WORK_POOL,
                 cwd: Path | None = None) -> None:
        self.prefect, self.env, self.pool, self.cwd = prefect, env, pool, cwd
        self.name = f"rehearsal-{secrets.token_hex(3)}"
        super().__init__()

    def start(self, timeout_s: float = 120.0) -> PrefectWorkerHandle:
        started = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="pwreh", dir="/tmp"))
        env = _clean_env(self.env, self.prefect.client_env(),
                         {"PREFECT_HOME": str(self.root), "DO_NOT_TRACK": "1"})
        cmd = [_console_script("prefect"), "worker", "start", "--pool", self.pool, "--type", "process",
               "--name", self.name, "--install-policy", "never"]
        self.server = ServiceProcess("prefect worker", cmd, self.root / "worker.log", env=env,
                                     cwd=self.cwd or self.root)
        wait_until(lambda: any(w["name"] == self.name for w in pool_workers(self.prefect.api_url, self.pool)),
                   self.server, timeout_s)
        return PrefectWorkerHandle(self.pool, self.name, time.monotonic() - started)


@dataclass(frozen=True)
class DeploymentsHandle:
    names: tuple[str, ...]  # as the API lists them (deployment names, without the flow's)
    startup_s: float = 0.0


def registered_deployments(api_url: str) -> list[dict[str, Any]]:
    import httpx

    response = httpx.post(f"{api_url}/deployments/filter", json={}, timeout=10)
    response.raise_for_status()
    return response.json()


class PrefectDeployments:
    """The project's prefect.yaml registered with `prefect deploy --all`, as an operator registers it,
    with two changes for a machine that is not the project image: runs pull into `project_dir` (the
    image's WORKDIR there) and every schedule is paused, since the rehearsal triggers its runs itself
    and a nightly run would queue among them (the deployments allow one run at a time)."""

    def __init__(self, prefect: PrefectHandle, project_dir: Path) -> None:
        self.prefect, self.project_dir = prefect, project_dir
        self.root: Path | None = None

    def start(self, timeout_s: float = 300.0) -> DeploymentsHandle:
        import yaml

        started = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="pdreh", dir="/tmp"))
        document = yaml.safe_load((self.project_dir / "prefect.yaml").read_text())
        for step in document.get("pull") or []:
            if "prefect.deployments.steps.set_working_directory" in step:
                step["prefect.deployments.steps.set_working_directory"]["directory"] = str(self.project_dir)
        for deployment in document["deployments"]:
            for schedule in deployment.get("schedules") or []:
                schedule["active"] = False
        prefect_file = self.root / "prefect.yaml"
        prefect_file.write_text(yaml.safe_dump(document, sort_keys=False))
        env = _clean_env(self.prefect.client_env(), {"PREFECT_HOME": str(self.root), "DO_NOT_TRACK": "1"})
        cmd = [_console_script("prefect"), "--no-prompt", "deploy", "--all",
               "--prefect-file", str(prefect_file)]
        out = subprocess.run(cmd, cwd=self.project_dir, env=env, capture_output=True, text=True,
                             timeout=timeout_s)
        if out.returncode != 0:
            raise RuntimeError(f"prefect deploy failed (rc={out.returncode}):\n{out.stdout[-3000:]}"
                               f"{out.stderr[-3000:]}")
        names = tuple(sorted(d["name"] for d in registered_deployments(self.prefect.api_url)))
        expected = {d["name"] for d in document["deployments"]}
        if not expected <= set(names):
            raise RuntimeError(f"prefect deploy registered {names}, not all of {sorted(expected)}")
        return DeploymentsHandle(names, time.monotonic() - started)

    def alive(self) -> bool:
        return False  # a command that has returned; the registrations live in the server

    def stop(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- Ray


@dataclass(frozen=True)
class RayHandle:
    address: str
    dashboard_url: str
    token_path: Path
    token: str = field(repr=False)
    startup_s: float = 0.0

    def client_env(self) -> dict[str, str]:
        """A driver's environment: the GCS address, the dashboard (Serve REST API, where `promote`
        and `rollback` switch the served version) and the token file (Ray's clients read it)."""
        return {"RAY_ADDRESS": self.address, "RAY_DASHBOARD_ADDRESS": self.dashboard_url,
                "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path),
                "RAY_USAGE_STATS_ENABLED": "0"}

    def auth_headers(self) -> dict[str, str]:
        """For HTTP clients of the dashboard (Jobs and Serve REST APIs)."""
        return {"Authorization": f"Bearer {self.token}"}


class LocalRay:
    """A head and `num_nodes - 1` workers (`ray start`, token auth, dashboard on loopback), the
    nodes' environment holding `node_env` as a cluster's pods do.

    The head's 3 logical CPUs hold a Serve app (1.25 CPU: model replica and ingress) while a
    retraining runs beside it (a 1-CPU Train worker and Ray Data's 1-CPU read tasks), as serving
    and training share a cluster; the worker node's CPU takes a second replica or Train worker.
    """

    def __init__(self, node_env: dict[str, str] | None = None, num_nodes: int = 2, cpus_per_node: int = 1,
                 head_cpus: int | None = 3) -> None:
        self.cluster = LocalRayCluster(num_nodes=num_nodes, cpus_per_node=cpus_per_node,
                                       dashboard_port=free_port(), head_cpus=head_cpus,
                                       node_env=dict(node_env or {}))

    def start(self, timeout_s: float = 180.0) -> RayHandle:
        started = time.monotonic()
        self.cluster.start(timeout_s=timeout_s)
        return RayHandle(self.cluster.address, self.cluster.dashboard_url, self.cluster.token_path,
                         self.cluster.auth_token, time.monotonic() - started)

    def alive(self) -> bool:
        return bool(self.cluster.processes())

    def stop(self) -> None:
        self.cluster.stop()  # removes its temp dir and token file too


# ---------------------------------------------------------------- the whole stack


@dataclass
class Rehearsal:
    """Every service, started in dependency order and stopped in reverse (also on failure).

    Services that depend on nothing (PostgreSQL, S3, the Prefect server) start side by side: most
    of a start-up is waiting on imports, migrations and sockets, not CPU.
    """

    postgres: PostgresHandle | None = None
    s3: S3Handle | None = None
    mlflow: MlflowHandle | None = None
    ray: RayHandle | None = None
    prefect: PrefectHandle | None = None
    worker: PrefectWorkerHandle | None = None
    deployments: DeploymentsHandle | None = None
    # Where the worker runs flow runs from (the project checkout, as the image's WORKDIR); with it,
    # the checkout's prefect.yaml is deployed.
    worker_cwd: Path | None = None
    startup_s: float = 0.0
    _services: list[Any] = field(default_factory=list, repr=False)
    _stopped: list[Any] = field(default_factory=list, repr=False)

    def start(self, num_ray_nodes: int = 2) -> Rehearsal:
        started = time.monotonic()
        try:
            with ThreadPoolExecutor(max_workers=3, thread_name_prefix="rehearsal") as pool:
                postgres = pool.submit(self._start, LocalPostgres())
                s3 = pool.submit(self._start, LocalS3())
                prefect = pool.submit(self._start, LocalPrefectServer())
                self.postgres, self.s3 = postgres.result(), s3.result()
                self.mlflow = self._start(LocalMlflowServer(self.postgres, self.s3))
                # The Ray nodes hold what the pods hold: S3 (datasets, checkpoints), the MLflow account.
                self.ray = self._start(LocalRay({**self.s3.client_env(), **self.mlflow.client_env()},
                                                num_nodes=num_ray_nodes))
                self.prefect = prefect.result()
            self.worker = self._start(LocalPrefectWorker(self.prefect, self.client_env(),
                                                         cwd=self.worker_cwd))
            if self.worker_cwd is not None:
                self.deployments = self._start(PrefectDeployments(self.prefect, self.worker_cwd))
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.monotonic() - started
        logger.info("rehearsal stack up in %.1f s: %s", self.startup_s, self.startup_times())
        return self

    def _start(self, service: Any) -> Any:
        self._services.append(service)  # before start(): stop() also ends a half-started service
        handle = service.start()
        logger.info("%s up in %.1f s", type(service).__name__, handle.startup_s)
        return handle

    def client_env(self) -> dict[str, str]:
        """Everything a pipeline process (CLI, flow run) adds to its environment."""
        env: dict[str, str] = {}
        for handle in (self.s3, self.mlflow, self.ray, self.prefect):
            if handle is not None:
                env.update(handle.client_env())
        return env

    def startup_times(self) -> dict[str, float]:
        handles = {"postgres": self.postgres, "s3": self.s3, "mlflow": self.mlflow, "ray": self.ray,
                   "prefect_server": self.prefect, "prefect_worker": self.worker,
                   "prefect_deploy": self.deployments}
        return {name: round(h.startup_s, 1) for name, h in handles.items() if h is not None}

    def stop(self) -> None:
        self._stopped.extend(self._services)
        while self._services:
            service = self._services.pop()
            try:
                service.stop()
            except Exception:  # stop the rest whatever one of them raised
                logger.exception("stopping %s failed", type(service).__name__)

    def survivors(self) -> list[str]:
        """Services of this stack with a process still alive (after stop(): none, or a bug)."""
        return [type(s).__name__ for s in [*self._services, *self._stopped] if s.alive()]

    def __enter__(self) -> Rehearsal:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def close(self) -> None:  # contextlib.closing
        self.stop()


def write_env_file(path: Path, env: dict[str, str]) -> Path:
    """`export` lines for a shell, in a file only its owner can read (it holds credentials)."""
    path.unlink(missing_ok=True)
    return _private_file(path, "".join(f"export {k}={v}\n" for k, v in sorted(env.items())))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["up"])
    parser.add_argument("--ray-nodes", type=int, default=2)
    parser.add_argument("--env-file", type=Path, default=Path("rehearsal.env"),
                        help="where to write the clients' exports (mode 0600; it holds credentials)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    interrupt_on_stop_signals()
    stack = Rehearsal(worker_cwd=Path.cwd())
    with contextlib.closing(stack.start(num_ray_nodes=args.ray_nodes)):
        env_file = write_env_file(args.env_file.resolve(), stack.client_env())
        print(f"MLflow        {stack.mlflow.tracking_uri}  (user {stack.mlflow.username}, "
              f"password in {env_file})")
        print(f"Prefect       {stack.prefect.api_url.removesuffix('/api')}  (pool {stack.worker.pool}, "
              f"worker {stack.worker.name}, deployments {', '.join(stack.deployments.names)}, "
              "schedules paused)")
        print(f"Ray dashboard {stack.ray.dashboard_url}  "
              f"(Authorization: Bearer $(cat {stack.ray.token_path}))")
        print(f"Ray address   {stack.ray.address}")
        print(f"S3            {stack.s3.endpoint_url}  bucket {stack.s3.bucket}")
        print(f"start-up (s)  {stack.startup_times()}")
        print(f"clients:      source {env_file}    Ctrl-C stops everything", flush=True)
        try:
            serve_until_stopped()
        finally:
            env_file.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
