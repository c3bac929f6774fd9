"""The registry lock: one read-modify-write of a registry (new version + `candidate` alias, a
promotion, a rollback) at a time per MLflow store. Held only for a few quick registry calls.

Two layers, taken in this order, each with a deadline (a holder that never lets go gives a
RegistryError naming the lock, not a hang):

- This host: an exclusive `filelock.FileLock` on `mlflow-registry-<hash of the tracking URI>.lock`.
  By default the file lives in a folder private to the user (`<temp dir>/diffusion-pipeline-<uid>`,
  created with mode 0700 and refused if it is a symlink, another user's, or open to others), so no
  other user can plant a file or a symlink there. filelock opens the file with O_NOFOLLOW and
  O_CREAT|O_EXCL, never truncates it, and the kernel drops the lock when its holder exits.
- Across hosts: whenever a Prefect API is configured (PREFECT_API_URL: the shared server that every
  host's flows report to), a Prefect global concurrency limit of one slot, named like the lock
  file. Its slot is a lease: Prefect renews it while held and frees it when the holder dies.
  Without a Prefect API nothing coordinates hosts (a temporary local Prefect server cannot), so
  several hosts writing one registry need a shared Prefect server.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout

from diffusion_core.adapters.mlflow_registry.config import DEFAULT_LOCK_TIMEOUT_S
from diffusion_core.adapters.mlflow_registry.errors import RegistryError

LEASE_S = 60.0  # Prefect's shortest lease: a dead holder's slot frees within a minute


def lock_name(tracking_uri: str) -> str:
    """The lock's name for a store: the same on every host, and no credentials in it."""
    return f"mlflow-registry-{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}"


def private_lock_dir() -> Path:
    """`<temp dir>/diffusion-pipeline-<uid>`, created 0700; RegistryError unless it is a real
    directory owned by this user and closed to everyone else."""
    directory = Path(tempfile.gettempdir()) / f"diffusion-pipeline-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    info = os.lstat(directory)
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IRWXG | stat.S_IRWXO)):
        raise RegistryError(
            f"lock_dir: {directory} is not a private folder of this user (a directory, not a symlink, "
            "owned by this user, mode 0700)",
            hint="someone else may have created it: remove it, or set registry.lock_dir")
    return directory


def lock_path(tracking_uri: str, lock_dir: Path | None = None) -> Path:
    """The host-local lock file of `tracking_uri` (in `lock_dir`, default `private_lock_dir()`)."""
    if lock_dir is None:
        directory = private_lock_dir()
    else:
        directory = Path(lock_dir)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    return directory / f"{lock_name(tracking_uri)}.lock"


@contextlib.contextmanager
def registry_lock(tracking_uri: str, lock_dir: Path | None = None,
                  timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the host lock of `tracking_uri` and, with a Prefect API configured, its cross-host slot."""
    with _host_lock(lock_path(tracking_uri, lock_dir), timeout_s):
        if prefect_api_configured():
            with _prefect_slot(lock_name(tracking_uri), timeout_s):
                yield
        else:
            yield


@contextlib.contextmanager
def _host_lock(path: Path, timeout_s: float) -> Iterator[None]:
    lock = FileLock(path, timeout=timeout_s, mode=0o600, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise _timeout(f"registry lock file {path}", timeout_s) from None
    except OSError as err:  # ELOOP: a symlink where the lock file should be
        raise RegistryError(f"lock_dir: cannot open the registry lock file {path} ({err.strerror}); "
                            "it must be a regular file, not a symlink") from None
    try:
        yield
    finally:
        lock.release()


def prefect_api_configured() -> bool:
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


@contextlib.contextmanager
def _prefect_slot(name: str, timeout_s: float) -> Iterator[None]:
    from prefect.concurrency.sync import concurrency

    _ensure_limit(name)
    try:
        with concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S, strict=True):
            yield
    except TimeoutError:
        raise _timeout(f"Prefect global concurrency limit {name!r}", timeout_s) from None


def _ensure_limit(name: str) -> None:
    """Create the one-slot limit `name` unless it exists (creation is atomic on the server)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def _timeout(what: str, timeout_s: float) -> RegistryError:
    return RegistryError(
        f"lock: {what} still held after {timeout_s:g}s",
        hint="another registration, promotion or rollback against this MLflow store is running; wait for "
             "it, stop it, or raise registry.lock_timeout_s")
