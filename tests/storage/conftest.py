"""A real S3 API for the file store tests: moto's server in its own process, on the port the
session stack gave its workers (``Stack.s3_port``), with one bucket. Skipped, with the reason,
where the ``s3`` and ``dev`` extras are not installed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sluice.service import Client
from sluice.stack import wait_for_port
from tests.conftest import S3_ACCESS_KEY, S3_REGION, S3_SECRET_KEY, Stack

BUCKET = "sluice-test"


@dataclass
class S3:
    """A client of its own, to look at what the file store did (not through the store)."""

    client: Any
    bucket: str = BUCKET

    async def keys(self, prefix: str) -> list[str]:
        listed = await self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [o["Key"] for o in listed.get("Contents", [])]

    async def uploads(self, prefix: str) -> list[str]:
        """Multipart uploads started and neither completed nor aborted."""
        listed = await self.client.list_multipart_uploads(Bucket=self.bucket, Prefix=prefix)
        return [u["UploadId"] for u in listed.get("Uploads", [])]

    async def body(self, key: str) -> bytes:
        response = await self.client.get_object(Bucket=self.bucket, Key=key)
        async with response["Body"] as body:
            return bytes(await body.read())

    async def head(self, key: str, part: int | None = None) -> dict[str, Any]:
        extra = {"PartNumber": part} if part is not None else {}
        return dict(await self.client.head_object(Bucket=self.bucket, Key=key, **extra))


@pytest.fixture(scope="session")
def s3_server(stack: Stack) -> Iterator[str]:
    pytest.importorskip("aiobotocore", reason="needs the s3 extra: pip install -e '.[dev,s3]'")
    pytest.importorskip("moto.server", reason="needs moto[server] (the dev extra)")
    with (stack.root / "moto.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(stack.s3_port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_for_port("127.0.0.1", stack.s3_port, timeout=60)
        yield stack.s3_url
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="session")
async def s3(s3_server: str) -> AsyncIterator[S3]:
    from aiobotocore.session import get_session

    async with get_session().create_client(
        "s3",
        endpoint_url=s3_server,
        region_name=S3_REGION,
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
    ) as client:
        await client.create_bucket(Bucket=BUCKET)
        yield S3(client)


@pytest.fixture(scope="session")
async def s3_client(stack: Stack, s3: S3) -> AsyncIterator[Client]:
    """A client whose uploads go to the object store (``s3://sluice-test/imports``); the
    workers, set to store in PostgreSQL, read them from wherever the files row says."""
    c = Client(stack.settings(stack.file_store(f"s3://{s3.bucket}/imports")))
    yield c
    await c.close()
