"""The S3 backend of `ObjectStore`: boto3 with botocore's retries, and our own ranged downloads.

A download never asks for an object's size first: its first GET's answer tells the total,
and whether and how the rest is split into parallel ranges is `ranged_get`'s `RangePolicy`.
Uploads go through boto3's managed transfer.

Connection settings come from `spec.storage`; credentials only from the standard AWS
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, or a web
identity for IRSA). Library errors become one-line `ConfigError`/`StorageUnavailable`
messages naming the bucket or endpoint, never the credentials.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kubetune.api.spec import StorageSpec
from kubetune.api.uris import parse_uri
from kubetune_trainer.exitcodes import ConfigError, StorageUnavailable
from kubetune_trainer.storage.interface import Fetched, ObjectInfo, ObjectReplaced
from kubetune_trainer.storage.s3_http import ObjectGetter
from kubetune_trainer.storage.s3_ranges import RangePolicy, ranged_get

MiB = 1024 * 1024
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "403", "Forbidden"}


@dataclass(frozen=True)
class TransferSettings:
    """How objects are cut into ranges: up to `per_file_concurrency` GETs of one object at once.

    Without a `chunk_size`, a download's ranges are sized from its first GET (`RangePolicy`):
    each range must stream at least four times as long as the server takes to answer, so a
    request's latency (and price) stays a small share. A fixed `chunk_size` cuts every object
    the same way. Uploads go multipart above `multipart_threshold`, in parts of `chunk_size`
    (or of `multipart_threshold` without one).
    """

    multipart_threshold: int = 64 * MiB
    chunk_size: int | None = None
    per_file_concurrency: int = 4


def _client_config(spec: StorageSpec, transfer: TransferSettings):
    from botocore.config import Config

    retries = {"mode": os.environ.get("AWS_RETRY_MODE", "standard"),
               "max_attempts": int(os.environ.get("AWS_MAX_ATTEMPTS", "5"))}
    return Config(
        region_name=spec.region,
        retries=retries,
        s3={"addressing_style": spec.addressing_style},
        max_pool_connections=max(10, spec.max_concurrency * transfer.per_file_concurrency),
        connect_timeout=10,
        read_timeout=60,
        # Downloads are checked by `s3_ranges` against the ETag or the stored CRC32 (ranges carry none).
        response_checksum_validation="when_required",
        parameter_validation=False,  # parameters are built here, never taken from users
    )


@functools.cache
def _shared_loader():
    """botocore's loader of service models, shared by every session of this process: a session of
    its own parses the S3 model's JSON again (about 0.2 s of CPU per store)."""
    from botocore.loaders import create_loader

    return create_loader()


def _botocore_session():
    """A botocore session that leaves timestamps as text: nothing here reads them, and parsing
    every LastModified of a listing or a GET costs more than the rest of the response."""
    import botocore.session

    session = botocore.session.get_session()
    session.register_component("data_loader", _shared_loader())
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=str)
    return session


class S3Store:
    """s3://bucket/key objects on AWS or any S3-compatible endpoint."""

    def __init__(self, spec: StorageSpec, transfer: TransferSettings | None = None) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig

        self.endpoint = spec.endpoint or "AWS S3"
        self.transfer = transfer or TransferSettings()
        session = boto3.session.Session(
            botocore_session=_botocore_session(),
            aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            aws_session_token=os.environ.get("AWS_SESSION_TOKEN"),
            region_name=spec.region,
        )
        self.client = session.client("s3", endpoint_url=spec.endpoint, config=_client_config(spec, self.transfer))
        self.getter = ObjectGetter(self.client)
        self.ranges = RangePolicy(chunk=self.transfer.chunk_size, streams=self.transfer.per_file_concurrency)
        self.transfer_config = TransferConfig(
            multipart_threshold=self.transfer.multipart_threshold,
            multipart_chunksize=self.transfer.chunk_size or self.transfer.multipart_threshold,
            max_concurrency=self.transfer.per_file_concurrency,
            use_threads=True,
        )

    def list(self, prefix_uri: str, limit: int | None = None) -> list[ObjectInfo]:
        bucket, prefix = _split(prefix_uri)
        found: list[ObjectInfo] = []
        paging = {} if limit is None else {"MaxItems": limit, "PageSize": min(limit, 1000)}
        with self._errors(prefix_uri):
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                          PaginationConfig=paging)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    found.append(ObjectInfo(f"s3://{bucket}/{key}", key[len(prefix):], int(item["Size"]),
                                            item.get("ETag", "").strip('"')))
        return found

    def download(self, uri: str, path: Path) -> Fetched:
        bucket, key = _split(uri)
        with self._errors(uri):
            return ranged_get(self.getter, bucket, key, path, self.ranges, uri)

    def upload(self, path: Path, uri: str) -> None:
        bucket, key = _split(uri)
        with self._errors(uri):
            self.client.upload_file(str(path), bucket, key, Config=self.transfer_config)

    def create(self, path: Path, uri: str) -> bool:
        """Put a small file at `uri` only if no object is there (`If-None-Match: *`): whether it did.
        A server without conditional writes (501) gets a plain put: True, the caller reads it back."""
        from botocore.exceptions import ClientError

        bucket, key = _split(uri)
        with self._errors(uri):
            try:
                self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes(), IfNoneMatch="*")
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", ""))
                if code in ("412", "PreconditionFailed", "409", "ConditionalRequestConflict"):
                    return False
                if code not in ("501", "NotImplemented"):
                    raise
                self.client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())
        return True

    def delete(self, uri: str) -> None:
        bucket, key = _split(uri)
        with self._errors(uri):
            self.client.delete_object(Bucket=bucket, Key=key)

    @contextmanager
    def _errors(self, uri: str) -> Iterator[None]:
        """Turn botocore's exceptions into one line naming what failed."""
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import (
            ClientError,
            ConnectionError,
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        try:
            yield
        except S3UploadFailedError as exc:  # boto3 wraps the ClientError that says why
            cause = exc.__cause__ or exc.__context__
            raise (_client_error(cause, uri) if isinstance(cause, ClientError) else
                   StorageUnavailable(f"upload to {uri} failed: {exc}".splitlines()[0])) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise ConfigError(f"no usable S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY (storage.secretRef on a cluster)") from exc
        except (ConnectionError, HTTPClientError) as exc:
            raise StorageUnavailable(f"cannot reach S3 endpoint {self.endpoint} for {uri}: "
                                     f"{type(exc).__name__}") from exc
        except ClientError as exc:
            raise _client_error(exc, uri) from exc


def _client_error(exc, uri: str) -> Exception:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    bucket = parse_uri(uri).location
    if code in _CREDENTIAL_CODES:
        return ConfigError(f"S3 refused access to s3://{bucket} ({code}): check the credentials "
                           "in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (storage.secretRef)")
    if code == "NoSuchBucket":
        return ConfigError(f"S3 bucket {bucket!r} does not exist (from {uri}): create it or fix the URI")
    if code in ("404", "NoSuchKey"):
        return FileNotFoundError(f"{uri} does not exist")
    if code in ("412", "PreconditionFailed"):
        return ObjectReplaced(f"{uri} was replaced while it was being downloaded; run again")
    return StorageUnavailable(f"S3 error on {uri}: {code} {error.get('Message', '')}".strip())


def _split(uri: str) -> tuple[str, str]:
    parsed = parse_uri(uri)
    if parsed.scheme != "s3":
        raise ConfigError(f"{uri} is not an s3:// URI")
    return parsed.location, parsed.path
