"""Files as objects in an S3-compatible store (AWS S3, MinIO, Ceph, R2, ...), selected by
``SLUICE_FILE_STORE=s3://bucket/prefix``. Needs the ``s3`` extra (aiobotocore).

An upload is streamed in multipart parts of ``SLUICE_S3_PART_BYTES`` (a file smaller than one
part is one PUT): memory holds one part at a time whatever the file's size, and a failed upload
is aborted. Reads stream the object. The size, sha256, compression and encoding are found in
the same single pass as with PostgreSQL, and kept in the ``files`` row with the object's
bucket and key (``sluice.storage.filestore``).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any

import asyncpg

from sluice.config import FileStoreSettings
from sluice.errors import (
    FileGone,
    FileTooLarge,
    InvalidConfig,
    ObjectStoreRefused,
    ObjectStoreUnavailable,
)
from sluice.schemas.events import FileRef
from sluice.schemas.formats import FileInspection
from sluice.storage.filestore import Objects, ObjectsProvider, Sha256Only, StoredFiles, StoreKind

log = logging.getLogger(__name__)

MAX_PARTS = 10_000
"""S3's limit of parts in one multipart upload."""

_GONE = {"NoSuchKey", "NotFound", "404"}
_BUSY = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
_NO_SUCH_UPLOAD = "NoSuchUpload"


def _code(exc: Any) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


class S3Objects:
    """One aiobotocore S3 client, shared by every file store of a process; ``connect`` it,
    ``close`` it. Library errors come out as Sluice's: FileGone (no such object),
    ObjectStoreRefused (no bucket, wrong keys, no permission: terminal) and
    ObjectStoreUnavailable (no answer, a server error: retry)."""

    def __init__(self, client: Any, stack: contextlib.AsyncExitStack) -> None:
        self._client = client
        self._stack = stack

    @classmethod
    async def connect(cls, settings: FileStoreSettings) -> S3Objects:
        try:
            from aiobotocore.config import AioConfig
            from aiobotocore.session import get_session
        except ImportError as exc:
            raise InvalidConfig(
                "the object store needs aiobotocore: pip install 'sluice-ingest[s3]'"
            ) from exc
        options: dict[str, Any] = {}
        if settings.endpoint_url:
            options["endpoint_url"] = settings.endpoint_url
        if settings.region:
            options["region_name"] = settings.region
        if settings.access_key_id:
            # Without keys the library's standard chain applies (AWS_* variables, the shared
            # credentials file and profile, container and instance roles).
            options["aws_access_key_id"] = settings.access_key_id
            options["aws_secret_access_key"] = settings.secret_access_key.get_secret_value()
            if token := settings.session_token.get_secret_value():
                options["aws_session_token"] = token
        config = AioConfig(
            s3={"addressing_style": settings.addressing_style},
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=10,
            read_timeout=60,
            # S3-compatible stores other than AWS often refuse the CRC checksums botocore sends
            # by default since 1.36; the parts' Content-MD5 and our sha256 remain.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        stack = contextlib.AsyncExitStack()
        client = await stack.enter_async_context(
            get_session().create_client("s3", config=config, **options)
        )
        return cls(client, stack)

    async def close(self) -> None:
        await self._stack.aclose()

    @contextlib.contextmanager
    def _errors(self, doing: str, bucket: str, key: str = "") -> Iterator[None]:
        import aiohttp
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            NoRegionError,
            PartialCredentialsError,
        )

        where = f"s3://{bucket}/{key}"
        try:
            yield
        except ClientError as exc:
            code, status = _code(exc)
            message = exc.response.get("Error", {}).get("Message", "")
            if code in _GONE:
                raise FileGone(
                    f"{where} is not in the object store (deleted outside Sluice?); "
                    "import the file again"
                ) from exc
            if status >= 500 or code in _BUSY:
                raise ObjectStoreUnavailable(
                    f"the object store failed to {doing} {where}: {code} {message}"
                ) from exc
            raise ObjectStoreRefused(
                f"the object store refused to {doing} {where}: {code} {message}; check "
                "SLUICE_FILE_STORE (does the bucket exist?) and the SLUICE_S3_* credentials"
            ) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise ObjectStoreRefused(
                f"no credentials to {doing} {where}: set SLUICE_S3_ACCESS_KEY_ID and "
                "SLUICE_S3_SECRET_ACCESS_KEY, or AWS credentials (variables, profile, role)"
            ) from exc
        except NoRegionError as exc:
            raise ObjectStoreRefused(f"to {doing} {where}, set SLUICE_S3_REGION") from exc
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            # Connection refused or reset, timeouts, a body cut short.
            raise ObjectStoreUnavailable(
                f"the object store did not answer to {doing} {where}: {exc}"
            ) from exc

    async def check_bucket(self, bucket: str) -> None:
        """Fail early, with what to fix, when the bucket is missing or not ours to use."""
        with self._errors("use the bucket", bucket):
            await self._client.head_bucket(Bucket=bucket)

    async def put_object(
        self, bucket: str, key: str, data: bytes, content_type: str | None
    ) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        with self._errors("store", bucket, key):
            await self._client.put_object(Bucket=bucket, Key=key, Body=data, **extra)

    async def start_upload(self, bucket: str, key: str, content_type: str | None) -> str:
        extra = {"ContentType": content_type} if content_type else {}
        with self._errors("start an upload to", bucket, key):
            response = await self._client.create_multipart_upload(Bucket=bucket, Key=key, **extra)
        return str(response["UploadId"])

    async def upload_part(
        self, bucket: str, key: str, upload_id: str, number: int, data: bytes
    ) -> str:
        with self._errors(f"upload part {number} of", bucket, key):
            response = await self._client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
        return str(response["ETag"])

    async def complete_upload(
        self, bucket: str, key: str, upload_id: str, etags: Sequence[str]
    ) -> None:
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
        with self._errors("complete the upload of", bucket, key):
            await self._client.complete_multipart_upload(
                Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )

    async def abort_upload(self, bucket: str, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        try:
            with self._errors("abort the upload of", bucket, key):
                try:
                    await self._client.abort_multipart_upload(
                        Bucket=bucket, Key=key, UploadId=upload_id
                    )
                except ClientError as exc:
                    # Aborted or completed before: nothing is pending.
                    if _code(exc)[0] != _NO_SUCH_UPLOAD:
                        raise
        except FileGone:
            pass

    async def delete_object(self, bucket: str, key: str) -> None:
        """Deleting a missing object succeeds on S3; some compatible stores answer 404."""
        try:
            with self._errors("delete", bucket, key):
                await self._client.delete_object(Bucket=bucket, Key=key)
        except FileGone:
            pass

    async def stream(self, bucket: str, key: str, chunk_bytes: int) -> AsyncIterator[bytes]:
        """The object's bytes, at most ``chunk_bytes`` at a time, never more in memory."""
        with self._errors("read", bucket, key):
            response = await self._client.get_object(Bucket=bucket, Key=key)
        body = response["Body"]
        try:
            while True:
                with self._errors("read", bucket, key):
                    chunk = await body.read(chunk_bytes)
                if not chunk:
                    return
                yield chunk
        finally:
            body.close()


class S3FileStore(StoredFiles):
    """New files as objects ``<prefix><file id>`` in ``bucket``; the ``files`` row holds the
    metadata and where the object is."""

    kind = StoreKind.S3

    def __init__(
        self,
        pool: asyncpg.Pool,
        objects: ObjectsProvider,
        *,
        bucket: str,
        prefix: str = "",
        part_bytes: int = 8 * 2**20,
        inspect: Callable[[], FileInspection] = Sha256Only,
    ) -> None:
        super().__init__(pool, objects=objects, inspect=inspect)
        self._provider = objects
        self.bucket = bucket
        self.prefix = prefix
        self.part_bytes = part_bytes

    def key_of(self, file_id: uuid.UUID) -> str:
        return f"{self.prefix}{file_id}"

    async def put(
        self,
        chunks: AsyncIterable[bytes],
        *,
        name: str,
        content_type: str | None = None,
        max_bytes: int | None = None,
    ) -> FileRef:
        file_id = uuid.uuid4()
        key = self.key_of(file_id)

        async def started(upload_id: str) -> None:
            # Recorded so that an upload cut short by a crash is aborted when the row is pruned.
            await self._pool.execute(
                "UPDATE files SET upload_id = $2 WHERE id = $1", file_id, upload_id
            )

        sink = ObjectSink(
            await self._provider(),
            self.bucket,
            key,
            part_bytes=self.part_bytes,
            content_type=content_type,
            started=started,
        )
        # No PostgreSQL connection is held while the bytes go to the object store.
        return await self._store(
            self._pool,
            file_id,
            sink,
            chunks,
            name=name,
            content_type=content_type,
            max_bytes=max_bytes,
            bucket=self.bucket,
            key=key,
        )


class ObjectSink:
    """Sends a file to one object: whole parts of ``part_bytes`` as they fill (the last may be
    smaller), or a single PUT for a file smaller than one part."""

    def __init__(
        self,
        objects: Objects,
        bucket: str,
        key: str,
        *,
        part_bytes: int,
        content_type: str | None,
        started: Callable[[str], Awaitable[None]],
    ) -> None:
        self._objects = objects
        self._bucket = bucket
        self._key = key
        self._part_bytes = part_bytes
        self._content_type = content_type
        self._started = started
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._stored = False  # a PUT or a completion was sent: the object may exist
        self.etags: list[str] = []

    async def write(self, data: bytes) -> None:
        self._buf += data
        while len(self._buf) >= self._part_bytes:
            with memoryview(self._buf) as view:  # one copy of the part, not two
                part = bytes(view[: self._part_bytes])
            del self._buf[: self._part_bytes]
            await self._send(part)

    async def _send(self, part: bytes) -> None:
        if len(self.etags) == MAX_PARTS:
            raise FileTooLarge(
                f"the file needs more than {MAX_PARTS} parts of {self._part_bytes} bytes; "
                "raise SLUICE_S3_PART_BYTES"
            )
        if self._upload_id is None:
            self._upload_id = await self._objects.start_upload(
                self._bucket, self._key, self._content_type
            )
            await self._started(self._upload_id)
        etag = await self._objects.upload_part(
            self._bucket, self._key, self._upload_id, len(self.etags) + 1, part
        )
        self.etags.append(etag)

    async def finish(self) -> None:
        tail, self._buf = bytes(self._buf), bytearray()
        if self._upload_id is None:
            self._stored = True
            await self._objects.put_object(self._bucket, self._key, tail, self._content_type)
            return
        if tail:
            await self._send(tail)
        self._stored = True
        await self._objects.complete_upload(self._bucket, self._key, self._upload_id, self.etags)

    async def abort(self) -> None:
        self._buf = bytearray()
        if self._upload_id is not None:
            await self._objects.abort_upload(self._bucket, self._key, self._upload_id)
        if self._stored:
            # The PUT or the completion may have gone through before a later step (the row's
            # update) failed.
            await self._objects.delete_object(self._bucket, self._key)
