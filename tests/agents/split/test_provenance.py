"""Run provenance on the real stack: what each run read and how its columns were mapped, and
the same file imported twice."""

from __future__ import annotations

from pathlib import Path

import pytest

from sluice.schemas.runs import RunStatus
from sluice.service import Client
from tests.conftest import Stack, finish

pytestmark = pytest.mark.stack

FILE = ("ID;Item Name;Unit Price;Quantity;Notes\n1;apple;1.20;10;fresh\n2;pear;0.80;3;\n").encode(
    "cp1252"
) + "3;crème;2.00;5;é\n".encode("cp1252")


async def test_provenance_names_delimiter_encoding_aliases_and_ignored_columns(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "fruit.csv"
    path.write_bytes(FILE)
    done = await finish(client, await client.submit_file("t_prov", path), stack)
    assert done.status is RunStatus.COMPLETED, done.error
    p = done.provenance
    assert p is not None
    assert p["format"] == "csv" and p["delimiter"] == ";" and p["encoding"] == "cp1252"
    assert p["file"]["name"] == "fruit.csv" and p["file"]["size"] == len(FILE)
    assert len(p["sha256"]) == 64
    assert p["header"] == ["ID", "Item Name", "Unit Price", "Quantity", "Notes"]
    assert p["aliases"] == {"name": "Item Name", "price": "Unit Price", "qty": "Quantity"}
    assert p["columns"]["ID"] == "id" and p["ignored"] == ["Notes"]
    assert p["duplicate_of"] is None

    again = await finish(client, await client.submit_file("t_prov", path), stack)
    assert again.provenance and again.provenance["duplicate_of"] == str(done.id)
    assert again.unchanged_rows == 3  # reported, not skipped: this importer does not ask


async def test_the_same_file_is_skipped_when_the_importer_asks(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    path = tmp_path / "same.csv"
    path.write_bytes(FILE)
    first = await finish(client, await client.submit_file("t_skipdup", path), stack)
    assert first.created_rows == 3
    second = await finish(client, await client.submit_file("t_skipdup", path), stack)
    assert second.status is RunStatus.COMPLETED
    assert second.provenance and second.provenance["duplicate_of"] == str(first.id)
    assert (second.total_rows, second.processed_rows) == (0, 0)
    path.write_bytes(FILE + b"4;fig;1.00;1;\n")  # a different file is imported
    third = await finish(client, await client.submit_file("t_skipdup", path), stack)
    assert third.provenance and third.provenance["duplicate_of"] is None
    assert third.created_rows == 1 and third.unchanged_rows == 3
