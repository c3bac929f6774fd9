"""The page at GET /: a form to try the served model from a browser, on the same /generate API.

The page (serving/page.html) is one self-contained file: inline CSS and JS, no external scripts,
fonts or images, so it works offline. It carries no secret and no model details: it asks GET /model
for those (with the API key, when the endpoint has one: the page then asks for it and keeps it in
memory only), so the route itself is public, like /healthz.

The Content-Security-Policy allows exactly the page's own inline style and script (by their SHA-256
hashes, computed here from the file), images from data: URLs (the PNGs of /generate) and fetches to
the page's own origin, and nothing else: no other script, no framing, no form posts, and no
string-to-HTML sinks (Trusted Types), so server data can only reach the page as text.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass
from importlib import resources

PAGE_FILE = "page.html"
_BLOCK = {"style": re.compile(r"<style>(.*?)</style>", re.DOTALL),
          "script": re.compile(r"<script>(.*?)</script>", re.DOTALL)}


@dataclass(frozen=True)
class Page:
    html: bytes
    headers: dict[str, str]


def _source_hash(text: str) -> str:
    """A CSP source expression for an inline block: 'sha256-<base64 of SHA-256 of its UTF-8 text>'."""
    digest = hashlib.sha256(text.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


def _inline_block(html: str, tag: str) -> str:
    """The text of the page's one inline <tag> element (its hash goes into the CSP)."""
    blocks = _BLOCK[tag].findall(html)
    if len(blocks) != 1 or html.count(f"<{tag}") != 1:
        raise ValueError(f"{PAGE_FILE}: expected exactly one plain <{tag}> element, found {len(blocks)}")
    return blocks[0]


def content_security_policy(html: str) -> str:
    return "; ".join([
        "default-src 'none'",
        f"script-src {_source_hash(_inline_block(html, 'script'))}",
        f"style-src {_source_hash(_inline_block(html, 'style'))}",
        "img-src data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ])


def load_page() -> Page:
    """The page and the headers to send it with (read from the package; call once per replica)."""
    html = resources.files("serving").joinpath(PAGE_FILE).read_text(encoding="utf-8")
    return Page(html=html.encode(), headers={
        "Content-Security-Policy": content_security_policy(html),
        "X-Content-Type-Options": "nosniff",
        "X-Frame-Options": "DENY",
        "Referrer-Policy": "no-referrer",
        "Cross-Origin-Opener-Policy": "same-origin",
        "Cache-Control": "no-cache",
    })
