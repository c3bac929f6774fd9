"""Credentials out of URIs before they are logged, displayed or recorded.

A tracking URI such as `https://user:secret@mlflow.example/` or a storage URI with a signed query
(`...?X-Amz-Signature=...`) carries a secret. Everything that logs a URI, stores it as an MLflow
param or tag, writes it into a Prefect artifact or hands it to a Serve app's args passes it
through `redact_uri` first; the credentials themselves travel only through the environment (e.g.
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD / MLFLOW_TRACKING_TOKEN).
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# Query parameters that carry a secret in the URIs this project sees (signed S3/GCS URLs, tokens).
_SECRET_QUERY_KEYS = ("token", "key", "secret", "password", "passwd", "signature", "credential", "sig")


def has_credentials(uri: str) -> bool:
    """Whether `uri` embeds a password / user info or a secret query parameter."""
    return redact_uri(uri) != uri


def redact_uri(uri: str | None) -> str | None:
    """`uri` with its password (or bare user token) and secret query values replaced by ***.

    Scheme, host, port and path stay readable, so a redacted URI still says where it points. A
    string that is not a URI with a network location (a path, `sqlite:///x.db`) is returned as is.
    """
    if not uri or "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostport}" if sep else f"{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_is_secret_key(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _is_secret_key(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return uri  # urlunsplit would also drop the empty authority of sqlite:///...
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def strip_credentials(uri: str) -> str:
    """`uri` without any user info in its network location (for clients that take credentials from
    the environment instead)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    hostport = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, hostport, parts.path, parts.query, parts.fragment))


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(marker in lowered for marker in _SECRET_QUERY_KEYS)
