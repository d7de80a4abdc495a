"""Storage URIs: which schemes each field takes, and how each scheme must be spelled.

Local runs (`kubetune run`) may also use file:// and plain paths; cluster jobs may not,
because a path on the user's laptop means nothing inside a pod.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

Mode = Literal["cluster", "local"]

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_HF_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*(@[\w.\-/]+)?/?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_URL = re.compile(r"^https?://[^/\s:]+(:\d{1,5})?(/\S*)?$")

CLUSTER_SCHEMES: dict[str, tuple[str, ...]] = {
    "model": ("s3", "hf", "pvc"),
    "data": ("s3", "pvc"),
    "output": ("s3", "pvc"),
}
LOCAL_EXTRA: tuple[str, ...] = ("file", "path")


@dataclass(frozen=True)
class ParsedUri:
    """A URI split into scheme, location (bucket, repo, claim) and key/path."""

    scheme: str
    location: str
    path: str


def parse_uri(uri: str) -> ParsedUri:
    """Split a URI; a value without `scheme://` is a plain local path."""
    if "://" not in uri:
        return ParsedUri("path", "", uri)
    scheme, rest = uri.split("://", 1)
    if scheme == "file":
        return ParsedUri("file", "", "/" + rest.lstrip("/"))
    location, _, path = rest.partition("/")
    return ParsedUri(scheme, location, path)


def _spelling_problem(parsed: ParsedUri, uri: str) -> str | None:
    if parsed.scheme == "s3" and not _BUCKET.match(parsed.location):
        return f"{uri!r} needs a valid bucket: s3://bucket/prefix/ (3-63 lowercase letters, digits, '.', '-')"
    if parsed.scheme == "hf" and not _HF_REPO.match(uri[len("hf://") :]):
        return f"{uri!r} must be hf://org/name or hf://org/name@revision"
    if parsed.scheme == "pvc" and not (_DNS_LABEL.match(parsed.location) and len(parsed.location) <= 253):
        return f"{uri!r} must be pvc://claim-name/path with a valid PersistentVolumeClaim name"
    if parsed.scheme in ("file", "path") and not parsed.path.strip():
        return "a local path must not be empty"
    return None


def uri_problem(uri: str, role: str, mode: Mode) -> str | None:
    """Why `uri` cannot be used as a `role` ("model", "data", "output") URI, or None."""
    allowed = CLUSTER_SCHEMES[role] + (LOCAL_EXTRA if mode == "local" else ())
    parsed = parse_uri(uri)
    if parsed.scheme not in allowed:
        shown = ", ".join(f"{s}://" if s != "path" else "a plain path" for s in allowed)
        where = "on a cluster" if mode == "cluster" else "in local mode"
        got = "a plain path" if parsed.scheme == "path" else f"scheme {parsed.scheme}://"
        return f"{got} is not supported {where}; use one of: {shown}"
    return _spelling_problem(parsed, uri)


def endpoint_problem(endpoint: str) -> str | None:
    """Why `endpoint` is not a usable S3 endpoint URL, or None."""
    if not _URL.match(endpoint):
        return f"{endpoint!r} must be an http:// or https:// URL, e.g. http://minio.storage:9000"
    return None


def name_problem(name: str, max_length: int) -> str | None:
    """Why `name` cannot name a FineTuneJob, or None."""
    if len(name) > max_length:
        return f"must be at most {max_length} characters (child objects add suffixes); got {len(name)}"
    if not _DNS_LABEL.match(name):
        return "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending alphanumeric"
    return None


def is_within(inner: str, outer: str) -> bool:
    """True when `inner` names the same place as `outer` or lies under it."""
    a, b = parse_uri(inner), parse_uri(outer)
    if (a.scheme, a.location) != (b.scheme, b.location):
        return False
    a_path, b_path = a.path.strip("/"), b.path.strip("/")
    return not b_path or a_path == b_path or a_path.startswith(b_path + "/")


def overlaps(a: str, b: str) -> bool:
    """True when two prefixes share any object: one is the other or lies under it."""
    return is_within(a, b) or is_within(b, a)
