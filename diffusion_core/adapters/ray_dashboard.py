"""The Ray dashboard's HTTP API (Serve REST API, Jobs API): where the local one is, and the token
its requests carry.

Token authentication (Ray >= 2.52, `RAY_AUTH_MODE=token`): every request to the dashboard sends
`Authorization: Bearer <token>`. Ray has no public Python call that returns the token, so
`ray_auth_token` follows the lookup that Ray documents for its own clients (token-auth guide,
"Token Sources and Precedence"): RAY_AUTH_TOKEN, else the file named by RAY_AUTH_TOKEN_PATH, else
~/.ray/auth_token (where a local `ray.init()` writes the token it generates). Like Ray's clients,
a token found while RAY_AUTH_MODE is unset is used; RAY_AUTH_MODE=disabled sends none.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from diffusion_core.errors import ConfigError

AUTH_MODE_ENV = "RAY_AUTH_MODE"
AUTH_TOKEN_ENV = "RAY_AUTH_TOKEN"
AUTH_TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")
# The variable Ray's own dashboard clients (`serve deploy`, `serve status`) read, and their default.
DASHBOARD_ADDRESS_ENV = "RAY_DASHBOARD_ADDRESS"
DEFAULT_DASHBOARD_URL = "http://127.0.0.1:8265"


def ray_auth_token() -> str | None:
    """The Ray token this process would authenticate with, or None (see the module docstring).
    A RAY_AUTH_TOKEN_PATH that cannot be read is an error, as it is for Ray."""
    if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
        return None
    token = os.environ.get(AUTH_TOKEN_ENV, "").strip()
    if token:
        return token
    named = os.environ.get(AUTH_TOKEN_PATH_ENV)
    if named:
        try:
            token = Path(named).expanduser().read_text().strip()
        except OSError as err:
            raise ConfigError(f"{AUTH_TOKEN_PATH_ENV}: the token file cannot be read "
                              f"({err.strerror})") from None
        if not token:
            raise ConfigError(f"{AUTH_TOKEN_PATH_ENV}: the token file is empty")
        return token
    try:
        return DEFAULT_TOKEN_PATH.expanduser().read_text().strip() or None
    except OSError:
        return None


def dashboard_headers() -> dict[str, str]:
    """Headers for a request to a Ray dashboard: the bearer token when there is one."""
    token = ray_auth_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def connected_dashboard_url() -> str | None:
    """The dashboard of the Ray this process is connected to; None when it is not connected or that
    Ray runs no dashboard. `ray.init(ignore_reinit_error=True)` on a connected process returns its
    RayContext without restarting anything (Ray's documented behaviour)."""
    if not ray.is_initialized():
        return None
    address = ray.init(ignore_reinit_error=True).dashboard_url
    if not address:
        return None
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


def local_dashboard_url() -> str:
    """The local Ray's dashboard: the connected Ray's, else RAY_DASHBOARD_ADDRESS, else Ray's default.
    ConfigError when this process is connected to a Ray without a dashboard and none is named."""
    url = connected_dashboard_url() or os.environ.get(DASHBOARD_ADDRESS_ENV)
    if url:
        return url
    if ray.is_initialized():
        raise ConfigError("ray: the Ray this process is connected to runs no dashboard, which Serve's "
                          "REST API needs",
                          hint=f"start Ray with its dashboard, or set {DASHBOARD_ADDRESS_ENV}")
    return DEFAULT_DASHBOARD_URL
