"""Credentials never survive redaction; everything that says where a URI points does."""

from __future__ import annotations

import pytest

from diffusion_core.redact import MASK, has_credentials, redact_uri, strip_credentials


@pytest.mark.parametrize(("uri", "expected"), [
    ("https://alice:s3cr3t@mlflow.example:5000/api", f"https://alice:{MASK}@mlflow.example:5000/api"),
    ("https://tok3n@mlflow.example/", f"https://{MASK}@mlflow.example/"),
    ("postgresql://mlflow:pw@db:5432/mlflow", f"postgresql://mlflow:{MASK}@db:5432/mlflow"),
    ("https://b.s3.amazonaws.com/x?X-Amz-Signature=abc&X-Amz-Credential=AKIA&v=1",
     f"https://b.s3.amazonaws.com/x?X-Amz-Signature={MASK}&X-Amz-Credential={MASK}&v=1"),
])
def test_redact_uri_hides_secrets_and_keeps_the_location(uri: str, expected: str) -> None:
    redacted = redact_uri(uri)
    assert redacted == expected
    assert has_credentials(uri)
    for secret in ("s3cr3t", "tok3n", ":pw@", "abc", "AKIA"):
        assert secret not in redacted


@pytest.mark.parametrize("uri", ["sqlite:///tmp/mlflow.db", "http://127.0.0.1:5000", "/data/x", None, ""])
def test_redact_uri_leaves_uris_without_secrets_alone(uri: str | None) -> None:
    assert redact_uri(uri) == uri
    if uri:
        assert not has_credentials(uri)


def test_strip_credentials_removes_user_info_only() -> None:
    assert strip_credentials("https://alice:pw@host:5000/p?q=1") == "https://host:5000/p?q=1"
    assert strip_credentials("sqlite:///x.db") == "sqlite:///x.db"
