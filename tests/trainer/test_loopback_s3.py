"""The loopback S3 server keeps connections open between requests, as S3 does, requests
with bodies and error answers included."""

from __future__ import annotations

import http.client
import os
from typing import Any
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration


def _presigned(server: Any, method: str, bucket: str, key: str) -> str:
    url = server.client().generate_presigned_url(method, Params={"Bucket": bucket, "Key": key})
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}"


def test_one_connection_serves_several_requests_with_bodies_and_errors(s3_server: Any, s3_bucket: str) -> None:
    payload = os.urandom(300_000)
    s3_server.client().put_object(Bucket=s3_bucket, Key="kept/a.bin", Body=payload)
    host, port = urlsplit(s3_server.endpoint).hostname, urlsplit(s3_server.endpoint).port
    connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        sockets, statuses = [], []
        for method, path, body in [
            ("GET", _presigned(s3_server, "get_object", s3_bucket, "kept/a.bin"), None),
            ("PUT", _presigned(s3_server, "put_object", "no-such-bucket-here", "x"), os.urandom(200_000)),
            ("GET", _presigned(s3_server, "get_object", s3_bucket, "kept/a.bin"), None),
        ]:
            connection.request(method, path, body=body)
            answer = connection.getresponse()
            data = answer.read()
            sockets.append(connection.sock)
            statuses.append(answer.status)
            assert answer.getheader("Connection", "") != "close"
        assert statuses == [200, 404, 200] and data == payload
        assert sockets[0] is not None and all(sock is sockets[0] for sock in sockets)
    finally:
        connection.close()
