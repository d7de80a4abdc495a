"""Object GETs without botocore's per-call pipeline: a presigned URL sent on a pooled connection.

For one 64 KiB GetObject, botocore spends more CPU serialising, signing, emitting events,
building the user agent and parsing headers than moving the bytes; staging thousands of
small files, that client-side cost rather than the network limits files/s. The URL is
presigned by the same client, so endpoint, addressing style, credentials and their refresh
stay botocore's; the request goes out through botocore's own `URLLib3Session` (its TLS and
proxy handling). Failures become the `ClientError` botocore would raise, so callers map
them as before, and are retried within the client's attempt budget.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

RETRY_STATUS = frozenset({500, 502, 503, 504})
RETRY_CODES = frozenset({"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling",
                         "ThrottlingException"})
URL_LIFETIME_S = 3600
_KEYED_ENCRYPTION = ("aws:kms", "aws:kms:dsse")
_ERROR_FIELD = re.compile(rb"<(Code|Message)>([^<]*)</\1>")


@dataclass(frozen=True)
class Answer:
    """A successful GET: status, the headers that matter, and the unread body (a urllib3 response)."""

    status: int
    etag: str
    content_range: str
    content_length: int
    body: Any
    encrypted: bool = False
    """Encrypted with a key S3 does not own (SSE-KMS, SSE-C): its ETag is not an MD5 of the bytes."""


class ObjectGetter:
    """Sends GETs for s3://bucket/key with extra headers (Range, If-Match); `on_send` sees each one."""

    def __init__(self, client: Any) -> None:
        from botocore.httpsession import URLLib3Session
        from botocore.utils import get_environ_proxies

        config = client.meta.config
        self.client = client
        self.attempts = max(1, int((config.retries or {}).get("max_attempts", 5)))
        self.session = URLLib3Session(
            verify=os.environ.get("AWS_CA_BUNDLE") or True,
            proxies=get_environ_proxies(client.meta.endpoint_url),
            timeout=(config.connect_timeout, config.read_timeout),
            max_pool_connections=config.max_pool_connections,
        )
        self.on_send: Callable[[dict[str, str]], None] = lambda headers: None

    def get(self, bucket: str, key: str, headers: dict[str, str]) -> Answer:
        """The answer to one GET, retried on connection failures, 5xx and throttling."""
        from botocore.awsrequest import AWSRequest
        from botocore.exceptions import (
            ConnectionClosedError,
            ConnectTimeoutError,
            EndpointConnectionError,
            ReadTimeoutError,
        )

        url = self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key},
                                                 ExpiresIn=URL_LIFETIME_S)
        for attempt in range(1, self.attempts + 1):
            request = AWSRequest(method="GET", url=url, headers=headers).prepare()
            request.stream_output = True
            self.on_send(headers)
            try:
                response = self.session.send(request)
            except (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError):
                if attempt == self.attempts:
                    raise
                _back_off(attempt)
                continue
            if response.status_code < 300:
                return Answer(response.status_code, response.headers.get("ETag", "").strip('"'),
                              response.headers.get("Content-Range", ""),
                              int(response.headers.get("Content-Length", 0)), response.raw,
                              _keyed_encryption(response.headers))
            error = _client_error(response.status_code, response.content)
            if attempt == self.attempts or not _retryable(response.status_code, error):
                raise error
            _back_off(attempt)
        raise AssertionError("unreachable: the last attempt returns or raises")


def _keyed_encryption(headers: Any) -> bool:
    """Whether the answer's object is encrypted so that its ETag is no MD5 of its bytes."""
    return (headers.get("x-amz-server-side-encryption", "").lower() in _KEYED_ENCRYPTION
            or bool(headers.get("x-amz-server-side-encryption-customer-algorithm")))


def _client_error(status: int, body: bytes) -> Exception:
    """The ClientError botocore would raise for this S3 error answer."""
    from botocore.exceptions import ClientError

    fields = {name.decode(): value.decode("utf-8", "replace") for name, value in _ERROR_FIELD.findall(body or b"")}
    error = {"Code": fields.get("Code") or str(status), "Message": fields.get("Message", "")}
    return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


def _retryable(status: int, error: Any) -> bool:
    return status in RETRY_STATUS or error.response["Error"]["Code"] in RETRY_CODES


def _back_off(attempt: int) -> None:
    """Exponential back-off with full jitter, capped at 20 s (botocore's standard mode)."""
    time.sleep(random.uniform(0, min(20.0, 2.0 ** attempt)))
