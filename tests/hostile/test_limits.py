"""The rate limiter's token buckets and the upload name rules, without a server."""

from __future__ import annotations

import pytest

from sluice.api.ratelimit import RateLimitMiddleware, TokenBuckets
from sluice.api.uploads import safe_filename, unsupported_type

pytestmark = pytest.mark.hostile


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_serves_its_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=2, burst=3, clock=clock)
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # one token every 0.5 s
    assert buckets.take("b") == 0.0  # other keys have their own bucket
    clock.now += 0.5
    assert buckets.take("a") == 0.0
    assert buckets.take("a") > 0
    clock.now += 60  # refills up to the burst, not beyond
    assert [buckets.take("a") for _ in range(4)][-1] > 0


def test_buckets_are_bounded_least_recently_used_first() -> None:
    clock = Clock()
    buckets = TokenBuckets(rate=1, burst=1, max_keys=100, clock=clock)
    for i in range(10_000):
        buckets.take(f"addr:{i}")
    assert len(buckets) == 100


def test_clients_are_keyed_by_token_hash_or_address() -> None:
    token = b"secret-token-text"

    async def app(scope, receive, send):  # pragma: no cover - never called here
        raise AssertionError

    middleware = RateLimitMiddleware(
        app, buckets=TokenBuckets(1, 1), tokens=[token], cookie="sluice_session"
    )

    def scope(headers: list[tuple[bytes, bytes]]) -> dict:
        return {"type": "http", "path": "/x", "headers": headers, "client": ("10.1.2.3", 5)}

    by_header = middleware.client_key(scope([(b"authorization", b"Bearer " + token)]))
    by_cookie = middleware.client_key(scope([(b"cookie", b"sluice_session=" + token)]))
    assert by_header == by_cookie and by_header.startswith("token:")
    assert token.decode() not in by_header  # the hash, never the text
    wrong = middleware.client_key(scope([(b"authorization", b"Bearer guess")]))
    assert wrong == middleware.client_key(scope([])) == "addr:10.1.2.3"


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("../../etc/passwd", "passwd"),
        ("a\\b.csv", "b.csv"),
        ("C:\\Users\\me\\rows.csv", "rows.csv"),
        ("..", "upload"),
        ("", "upload"),
        (None, "upload"),
        ("x\x00y\n.csv", "xy.csv"),
        ("é" * 300 + ".csv", "é" * 255),
    ],
)
def test_upload_names_are_labels_without_paths(name: str | None, kept: str) -> None:
    assert safe_filename(name) == kept


@pytest.mark.parametrize(
    ("kind", "refused"),
    [
        ("text/csv", False),
        ("application/vnd.ms-excel", False),  # what Windows calls a .csv
        ("application/octet-stream", False),
        ("application/gzip", False),
        (None, False),
        ("image/png", True),
        ("application/pdf", True),
        ("application/zip", True),
        ("application/vnd.openxmlformats-officedocument.spreadsheetml.sheet", False),  # .xlsx
        ("application/vnd.apache.parquet", False),
        ("application/vnd.openxmlformats-officedocument.wordprocessingml.document", True),
        ("application/vnd.oasis.opendocument.spreadsheet", True),
    ],
)
def test_declared_binary_types_are_refused(kind: str | None, refused: bool) -> None:
    assert unsupported_type(kind) is refused
