"""A store in an S3 bucket (AWS or any S3-compatible server) through boto3.

Correctness comes from S3's conditional writes: ``IfNoneMatch='*'`` (create only) for content-addressed objects and
``IfMatch=<ETag>`` (compare-and-swap) for the manifest. Configuration is boto3's own: the endpoint from
``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (or the config file), credentials from the standard chain, the region
from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (default us-east-1). Retries are botocore's "standard" mode; there is no
retry loop here.

Uploads use only plain ``put_object`` / multipart calls on the calling thread: they also run inside an ``atexit``
handler, where ``concurrent.futures`` refuses new work ("cannot schedule new futures after interpreter shutdown"),
so boto3's managed transfer cannot be used.
Downloads of large objects use parallel ranged GETs written straight into the file at their offsets.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, NoReturn
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)

from ..config import Settings
from ..errors import ObjectNotFound, PreconditionFailed, StoreError
from .base import ObjectInfo, Progress, Store, check_name, too_large

__all__ = ["S3Store"]

log = logging.getLogger("compile_cache")

_MiB = 1 << 20
PART_SIZE = 8 * _MiB  # ranged-GET part; objects up to this size are one streamed GET
DOWNLOAD_WORKERS = 8
MULTIPART_THRESHOLD = 64 * _MiB  # put_immutable above this uses a multipart upload
UPLOAD_PART_SIZE = 16 * _MiB
_MAX_PARTS = 10_000  # S3's limit on parts per multipart upload
_READ_CHUNK = 1 * _MiB
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")

_NOT_FOUND = {"NoSuchKey", "NotFound", "404"}
_CONFLICT = {"PreconditionFailed", "ConditionalRequestConflict"}
_HINTS = {
    "AccessDenied": "check the credentials' permissions on the bucket",
    "InvalidAccessKeyId": "the access key id is unknown to the server",
    "SignatureDoesNotMatch": "the secret key is wrong for this access key id",
    "NoSuchBucket": "create the bucket or fix COMPILE_CACHE_URL",
    "SlowDown": "throttled by the server",
    "Throttling": "throttled by the server",
}


class S3Store(Store):
    """Objects are keys ``<prefix>/<name>`` in ``bucket``; the version token is the object's ETag (quoted as S3
    returns it; ``IfMatch`` accepts it as is)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
        max_pool_connections: int = 16,
    ) -> None:
        if not bucket:
            raise StoreError("s3 store: empty bucket name")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client or _make_client(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_attempts=max_attempts,
            max_pool_connections=max(max_pool_connections, DOWNLOAD_WORKERS * 2),
        )
        endpoint = urlsplit(self._client.meta.endpoint_url or "")
        # Only scheme and host:port: an endpoint URL could carry userinfo, which must never be shown.
        self.endpoint = f"{endpoint.scheme}://{endpoint.hostname}{f':{endpoint.port}' if endpoint.port else ''}"
        base = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.url = base if _is_aws(endpoint.hostname) else f"{base} (endpoint {self.endpoint})"

    @classmethod
    def from_url(cls, url: str, settings: Settings | None = None, **kwargs: Any) -> S3Store:
        """``s3://bucket[/prefix]``; ``kwargs`` go to the constructor (timeouts, attempts, a ready client)."""
        if not url.startswith("s3://"):
            raise StoreError(f"not an s3:// url: {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        return cls(bucket, prefix, **kwargs)

    # -- helpers -----------------------------------------------------------------------------------------------------
    def _key(self, name: str) -> str:
        check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, op: str, key: str, e: Exception) -> NoReturn:
        """Raise the framework's error for a boto3 failure: one line, operation + bucket/key + code, no secret."""
        where = f"S3 {op} s3://{self.bucket}/{key}"
        if not _is_aws(urlsplit(self.endpoint).hostname):
            where += f" at {self.endpoint}"
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code") or "Unknown")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _NOT_FOUND and code != "NoSuchBucket":
                raise ObjectNotFound(f"{where}: not found ({code})") from e
            if code in _CONFLICT or status == 412:
                raise PreconditionFailed(f"{where}: changed since read ({code}, HTTP {status})") from e
            hint = _HINTS.get(code, "")
            raise StoreError(f"{where} failed: {code} (HTTP {status}){f': {hint}' if hint else ''}") from e
        if isinstance(e, NoCredentialsError):
            raise StoreError(f"{where} failed: no AWS credentials found (set AWS_ACCESS_KEY_ID/...)") from e
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError)):
            raise StoreError(f"{where} failed: cannot connect ({type(e).__name__})") from e
        if isinstance(e, ReadTimeoutError):
            raise StoreError(f"{where} failed: read timeout") from e
        if isinstance(e, BotoCoreError):
            raise StoreError(f"{where} failed: {type(e).__name__}: {e}") from e
        raise e

    def _call(self, op: str, key: str, **kw: Any) -> Any:
        method = getattr(self._client, _snake(op))
        try:
            return method(Bucket=self.bucket, Key=key, **kw)
        except (ClientError, BotoCoreError) as e:
            self._fail(op, key, e)

    # -- primitives --------------------------------------------------------------------------------------------------
    def read_versioned(self, name: str, *, max_bytes: int | None = None) -> tuple[bytes, str]:
        key = self._key(name)
        if max_bytes is None:
            resp = self._call("GetObject", key)
        else:
            resp = self._get_capped(key, max_bytes)
        try:
            data = resp["Body"].read() if max_bytes is None else _read_at_most(resp["Body"], max_bytes + 1)
        except BotoCoreError as e:
            self._fail("GetObject", key, e)
        if max_bytes is not None and len(data) > max_bytes:  # a server that ignored the Range and the length
            resp["Body"].close()
            raise too_large(f"s3://{self.bucket}/{key}", None, max_bytes)
        return data, resp["ETag"]

    def _get_capped(self, key: str, max_bytes: int) -> dict[str, Any]:
        """A GET of at most ``max_bytes`` + 1 bytes (a Range), refused on its headers when the object's full size
        (Content-Range's total) is over the cap: the body is closed unread, so a huge object costs one request."""
        try:
            resp = self._call("GetObject", key, Range=f"bytes=0-{max_bytes}")
        except StoreError as e:
            if _code(e) != "InvalidRange":  # 416: the object is empty
                raise
            resp = self._call("GetObject", key)
        m = _CONTENT_RANGE.match(resp.get("ContentRange") or "")
        total = int(m.group(3)) if m else int(resp.get("ContentLength") or 0)
        if total > max_bytes:
            resp["Body"].close()
            raise too_large(f"s3://{self.bucket}/{key}", total, max_bytes)
        return resp

    def put_conditional(self, name: str, data: bytes, if_match: str | None) -> str:
        key = self._key(name)
        cond = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": if_match}
        return self._call("PutObject", key, Body=data, **cond)["ETag"]

    def put_immutable(self, name: str, src: Path) -> bool:
        key = self._key(name)
        size = os.path.getsize(src)
        if size > MULTIPART_THRESHOLD:
            return self._put_multipart(key, Path(src), size)
        try:
            with open(src, "rb") as f:
                self._put_once(key, f)
        except PreconditionFailed:
            return False
        return True

    def _put_once(self, key: str, f: BinaryIO) -> None:
        try:
            self._call("PutObject", key, Body=f, IfNoneMatch="*")
        except PreconditionFailed as e:
            # 409 ConditionalRequestConflict: another create of this key is in flight. S3 asks the client to
            # retry; the retry then sees the other's object (412) or succeeds if that writer gave up.
            if _code(e) != "ConditionalRequestConflict":
                raise
            f.seek(0)
            self._call("PutObject", key, Body=f, IfNoneMatch="*")

    def _put_multipart(self, key: str, src: Path, size: int) -> bool:
        # A HEAD first saves uploading a large object that is already there; IfNoneMatch on Complete closes the race.
        try:
            self._call("HeadObject", key)
            return False
        except ObjectNotFound:
            pass
        part_size = max(UPLOAD_PART_SIZE, -(-size // _MAX_PARTS))
        upload_id = self._call("CreateMultipartUpload", key)["UploadId"]
        try:
            parts = []
            with open(src, "rb") as f:
                number = 1
                while chunk := f.read(part_size):
                    r = self._call("UploadPart", key, UploadId=upload_id, PartNumber=number, Body=chunk)
                    parts.append({"PartNumber": number, "ETag": r["ETag"]})
                    number += 1
            self._call(
                "CompleteMultipartUpload",
                key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
            return True
        except PreconditionFailed:
            self._abort(key, upload_id)
            return False
        except BaseException:
            self._abort(key, upload_id)
            raise

    def _abort(self, key: str, upload_id: str) -> None:
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as e:  # the bucket's lifecycle rule is the backstop
            log.warning("could not abort multipart upload of s3://%s/%s: %s", self.bucket, key, type(e).__name__)

    def open_read(self, name: str) -> _Body:
        key = self._key(name)
        return _Body(self, key, self._call("GetObject", key)["Body"])

    def download(self, name: str, dest: Path, *, progress: Progress | None = None) -> int:
        key = self._key(name)
        with open(dest, "xb") as f:
            try:
                return _Download(self, key, f.fileno(), progress).run()
            except BaseException:
                f.close()
                Path(dest).unlink(missing_ok=True)
                raise

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        root = f"{self.prefix}/" if self.prefix else ""
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=root + prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"][len(root) :], obj["Size"], obj["LastModified"].timestamp())
        except (ClientError, BotoCoreError) as e:
            self._fail("ListObjectsV2", root + prefix, e)

    def exists(self, name: str) -> bool:
        # The smallest key starting with ``key`` is ``key`` itself if it exists: one LIST, and a missing bucket
        # still raises (a HEAD would answer a bare 404 for both).
        key = self._key(name)
        try:
            resp = self._client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1)
        except (ClientError, BotoCoreError) as e:
            self._fail("ListObjectsV2", key, e)
        return any(o["Key"] == key for o in resp.get("Contents", ()))

    def delete(self, name: str) -> None:
        self._call("DeleteObject", self._key(name))

    def outside_writers(self) -> str:
        return "an S3 bucket"

    def close(self) -> None:
        self._client.close()


class _Body:
    """A GET's streaming body: read(n) in chunks as they arrive; a transfer failure midway (read timeout, closed
    connection, fewer bytes than Content-Length) becomes the store's one-line StoreError."""

    def __init__(self, store: S3Store, key: str, body: Any) -> None:
        self.store, self.key, self.body = store, key, body

    def read(self, n: int = -1) -> bytes:
        try:
            return self.body.read(n if n >= 0 else None)
        except BotoCoreError as e:
            self.store._fail("GetObject", self.key, e)

    def __enter__(self) -> _Body:
        return self

    def __exit__(self, *exc: object) -> None:
        self.body.close()


class _Download:
    """One GET of the first part tells the size and ETag; larger objects get the rest as parallel ranged GETs
    (pinned to that ETag with IfMatch) written at their offsets with pwrite, into a file pre-sized to the total."""

    def __init__(self, store: S3Store, key: str, fd: int, progress: Progress | None) -> None:
        self.store, self.key, self.fd = store, key, fd
        self.stop = threading.Event()
        lock = threading.Lock()

        def report(n: int) -> None:
            if progress is not None:
                with lock:
                    progress(n)

        self.report: Callable[[int], None] = report

    def run(self) -> int:
        try:
            first = self.store._call("GetObject", self.key, Range=f"bytes=0-{PART_SIZE - 1}")
        except StoreError as e:
            if _code(e) != "InvalidRange":  # 416: the object is empty
                raise
            first = self.store._call("GetObject", self.key)
        m = _CONTENT_RANGE.match(first.get("ContentRange") or "")
        total = int(m.group(3)) if m else int(first["ContentLength"])
        if total <= PART_SIZE or not m:  # small, or a server that ignored Range and sent it all
            self._write(first, 0, total)
            return total
        os.ftruncate(self.fd, total)
        ranges = [(start, min(start + PART_SIZE, total)) for start in range(PART_SIZE, total, PART_SIZE)]
        etag = first["ETag"]
        pool = ThreadPoolExecutor(min(DOWNLOAD_WORKERS, len(ranges)), thread_name_prefix="compile-cache-get")
        futures: list[Future[None]] = []
        try:
            try:
                for start, end in ranges:
                    futures.append(pool.submit(self._part, start, end, etag))
            except RuntimeError:  # interpreter shutdown: no new threads; fetch the rest here, one by one
                log.debug("download of %s without a thread pool (interpreter shutting down)", self.key)
            ranges = ranges[len(futures) :]
            self._write(first, 0, PART_SIZE)
            for start, end in ranges:
                self._part(start, end, etag)
            for fut in futures:
                fut.result()
        except BaseException:
            self.stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return total

    def _part(self, start: int, end: int, etag: str) -> None:
        if self.stop.is_set():
            return
        resp = self.store._call("GetObject", self.key, Range=f"bytes={start}-{end - 1}", IfMatch=etag)
        self._write(resp, start, end - start)

    def _write(self, resp: dict[str, Any], offset: int, expected: int) -> None:
        body = resp["Body"]
        end = offset + expected
        try:
            while offset < end and not self.stop.is_set():
                chunk = body.read(min(_READ_CHUNK, end - offset))
                if not chunk:
                    break
                os.pwrite(self.fd, chunk, offset)
                offset += len(chunk)
                self.report(len(chunk))
        except BotoCoreError as e:
            self.store._fail("GetObject", self.key, e)
        finally:
            body.close()
        if offset != end and not self.stop.is_set():
            raise StoreError(f"S3 GetObject s3://{self.store.bucket}/{self.key}: short read ({offset} of {end})")


def _make_client(*, connect_timeout: float, read_timeout: float, max_attempts: int, max_pool_connections: int) -> Any:
    session = boto3.session.Session()
    # botocore reads AWS_DEFAULT_REGION and the config file but not AWS_REGION, which the other AWS SDKs (and
    # Lambda, ECS) set and prefer; honour both.
    region = os.environ.get("AWS_REGION") or session.region_name or "us-east-1"
    cfg = Config(
        region_name=region,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "max_attempts": max_attempts},
        max_pool_connections=max_pool_connections,
        # Every object is sha256-checked against the manifest as it is read: botocore's own CRC32 of each GET
        # (on by default since 1.36) would check the same bytes a second time, at a tenth of a restore's CPU.
        # Uploads keep their checksums: the server refuses a body damaged on the way.
        response_checksum_validation="when_required",
    )
    # boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself; we only learn whether one is set by asking the
    # client. Custom endpoints get path-style addressing: `bucket.host` rarely resolves for a self-hosted server.
    client = session.client("s3", config=cfg)
    if not _is_aws(urlsplit(client.meta.endpoint_url or "").hostname):
        client.close()
        client = session.client("s3", config=cfg.merge(Config(s3={"addressing_style": "path"})))
    return client


def _read_at_most(body: Any, limit: int) -> bytes:
    """Read ``body`` to its end or until ``limit`` bytes, whichever comes first."""
    chunks, n = [], 0
    while n < limit and (chunk := body.read(min(_READ_CHUNK, limit - n))):
        chunks.append(chunk)
        n += len(chunk)
    return b"".join(chunks)


def _code(e: BaseException) -> str | None:
    """The S3 error code behind one of our errors, if it came from a ClientError."""
    cause = e.__cause__
    return cause.response.get("Error", {}).get("Code") if isinstance(cause, ClientError) else None


def _is_aws(host: str | None) -> bool:
    return host is not None and host.endswith((".amazonaws.com", ".amazonaws.com.cn"))


def _snake(op: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", op).lower()
