"""The multipart scanner of sluice.api.body, however the body is cut into chunks: what it
passes on is what Starlette's form parser reads. (tests/hostile/test_slow_clients.py and
tests/hostile/test_http.py run the middleware in a real `sluice api`.)"""

from __future__ import annotations

import random
from collections.abc import AsyncGenerator

import pytest
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartParser

from sluice.api.body import _MultipartScanner

BOUNDARY = "b0undary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}".encode()


def body(disposition: str, data: bytes = b"id\n1\n") -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="note"\r\n\r\n'
        f"a; b\r\n--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n"
        f"Content-Type: text/csv\r\n\r\n".encode()
        + data
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def scanned(data: bytes, sizes: list[int]) -> tuple[bytes, bool]:
    scanner = _MultipartScanner.for_content_type(CONTENT_TYPE)
    assert scanner is not None
    out, at = [], 0
    for size in sizes:
        out.append(scanner.feed(data[at : at + size], final=False))
        at += size
    out.append(scanner.feed(data[at:], final=True))
    return b"".join(out), scanner.closed


async def parse(data: bytes) -> dict[str, object]:
    async def stream() -> AsyncGenerator[bytes, None]:
        yield data

    headers = Headers(raw=[(b"content-type", CONTENT_TYPE)])
    form = await MultiPartParser(headers, stream()).parse()
    return dict(form)


def cuts(data: bytes, seed: int) -> list[int]:
    rng = random.Random(seed)
    sizes, left = [], len(data)
    while left > 0:
        size = rng.choice([1, 2, 3, 7, 20, 64])
        sizes.append(size)
        left -= size
    return sizes


@pytest.mark.parametrize("seed", range(20))
async def test_an_rfc5987_name_reaches_the_parser_as_the_file_name(seed: int) -> None:
    data = body("form-data; name=\"file\"; filename*=UTF-8''pr%C3%BCfung%20%22x%22.csv")
    out, closed = scanned(data, cuts(data, seed))
    assert closed
    form = await parse(out)
    upload = form["file"]
    assert isinstance(upload, UploadFile)
    assert upload.filename == 'prüfung "x".csv'
    assert await upload.read() == b"id\n1\n"
    assert form["note"] == "a; b"


@pytest.mark.parametrize("seed", range(5))
async def test_other_bodies_pass_unchanged(seed: int) -> None:
    data = body('form-data; name="file"; filename="plain.csv"', data=b"x" * 5000)
    assert scanned(data, cuts(data, seed)) == (data, True)


def test_a_body_without_its_closing_boundary_is_not_closed() -> None:
    data = body('form-data; name="file"; filename="plain.csv"')
    cut = data[: data.rindex(b"--")]
    assert scanned(cut, [10] * (len(cut) // 10)) == (cut, False)
