"""The filesystem source on real files in tmp_path: what confine() refuses, what it reads."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from sluice.agents.fetch.filesystem import CHUNK_BYTES, confine, open_path
from sluice.errors import SourceError

DATA = random.Random(3).randbytes(2 * CHUNK_BYTES + 777)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """tmp/root (the file root) next to tmp/secret.txt (outside it)."""
    root = tmp_path / "root"
    (root / "in").mkdir(parents=True)
    (root / "in" / "orders.csv").write_bytes(DATA)
    (root / "top.csv").write_text("id\n1\n")
    (tmp_path / "secret.txt").write_text("do not read")
    os.symlink(tmp_path / "secret.txt", root / "leak.txt")
    os.symlink(root / "in" / "orders.csv", root / "alias.csv")
    return root


async def read(path: str, roots: list[Path]) -> tuple[str, str | None, bytes, list[int]]:
    async with open_path(path, roots) as fetched:
        chunks = [chunk async for chunk in fetched.chunks]
    return fetched.name, fetched.location, b"".join(chunks), [len(c) for c in chunks]


@pytest.mark.parametrize("path", ["../secret.txt", "a/../../secret.txt", "in/../../secret.txt"])
def test_traversal_is_refused(tree: Path, path: str) -> None:
    with pytest.raises(SourceError, match="outside the allowed file roots") as caught:
        confine(path, [tree])
    assert str(tree.resolve()) in str(caught.value)


def test_absolute_path_outside_is_refused(tree: Path) -> None:
    with pytest.raises(SourceError, match="outside the allowed file roots"):
        confine(str(tree.parent / "secret.txt"), [tree])


def test_missing_file_outside_is_refused_as_outside(tree: Path) -> None:
    # Not "does not exist": that would let a caller probe the disk outside the roots.
    with pytest.raises(SourceError, match="outside the allowed file roots"):
        confine(str(tree.parent / "nothing.txt"), [tree])


def test_symlink_leading_out_is_refused(tree: Path) -> None:
    with pytest.raises(SourceError, match="outside the allowed file roots"):
        confine("leak.txt", [tree])
    with pytest.raises(SourceError, match="outside the allowed file roots"):
        confine(str(tree / "leak.txt"), [tree])


def test_symlinked_folder_leading_out_is_refused(tree: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "data.csv").write_text("x\n")
    os.symlink(outside, tree / "door")
    with pytest.raises(SourceError, match="outside the allowed file roots"):
        confine("door/data.csv", [tree])


def test_folder_is_refused(tree: Path) -> None:
    with pytest.raises(SourceError, match="is a folder"):
        confine("in", [tree])


def test_missing_file_is_refused(tree: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        confine("in/nope.csv", [tree])


def test_no_roots_says_what_to_set(tree: Path) -> None:
    with pytest.raises(SourceError, match="set SLUICE_FILE_ROOTS"):
        confine("top.csv", [])


def test_nul_is_refused(tree: Path) -> None:
    with pytest.raises(SourceError, match="NUL"):
        confine("top.csv\0.txt", [tree])


def test_empty_path_is_refused(tree: Path) -> None:
    with pytest.raises(SourceError, match="empty"):
        confine("", [tree])


def test_paths_inside_are_resolved(tree: Path, tmp_path: Path) -> None:
    real = (tree / "in" / "orders.csv").resolve()
    assert confine("in/orders.csv", [tree]) == real
    assert confine(str(tree / "in" / "orders.csv"), [tree]) == real
    assert confine("in/../in/./orders.csv", [tree]) == real
    assert confine("alias.csv", [tree]) == real  # a symlink inside pointing inside
    # Relative paths go to the first root; an absolute path may use any root.
    other = tmp_path / "other"
    other.mkdir()
    (other / "b.csv").write_text("b\n")
    assert confine(str(other / "b.csv"), [tree, other]) == (other / "b.csv").resolve()
    with pytest.raises(SourceError, match="does not exist"):
        confine("b.csv", [tree, other])


async def test_open_path_streams_a_relative_path(tree: Path) -> None:
    name, location, data, sizes = await read("in/orders.csv", [tree])
    assert (name, location) == ("orders.csv", str((tree / "in" / "orders.csv").resolve()))
    assert data == DATA
    assert max(sizes) <= CHUNK_BYTES and len(sizes) == 3


async def test_open_path_reads_an_absolute_path_and_an_inner_symlink(tree: Path) -> None:
    _, _, data, _ = await read(str(tree / "top.csv"), [tree])
    assert data == b"id\n1\n"
    name, location, data, _ = await read("alias.csv", [tree])
    assert (name, location, data) == (
        "orders.csv",
        str((tree / "in" / "orders.csv").resolve()),
        DATA,
    )


async def test_open_path_refuses_before_reading(tree: Path) -> None:
    with pytest.raises(SourceError, match="outside the allowed file roots"):
        await read("leak.txt", [tree])


async def test_open_path_can_be_left_early(tree: Path) -> None:
    async with open_path("in/orders.csv", [tree]) as fetched:
        first = await anext(fetched.chunks)
    assert first == DATA[:CHUNK_BYTES]
