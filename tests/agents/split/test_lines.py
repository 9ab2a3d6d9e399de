"""COPY lines held as one body (agents/split/lines.py): batches cut from the pieces of many
ranges are the bytes the lines one by one gave, whatever the pieces' sizes."""

from __future__ import annotations

import pickle
import random

import pytest

from sluice.agents.split.lines import CopyLines, cut, lines_in, steps
from sluice.agents.split.route import BatchRouter
from sluice.errors import FileFormatError
from sluice.schemas.events import COPY_BATCH, copy_lines, decode_copy_rows, encode_copy_lines

COLUMNS = ("_sluice_row", "_sluice_sub", "id", "note")


def rows(first: int, count: int, rnd: random.Random) -> list[str]:
    notes = ["a", "é", "tab\there", "back\\slash", "x" * 50, "", "\u2028 \x1c"]
    return copy_lines(
        [[str(n), "0", f"k{n}", rnd.choice(notes)] for n in range(first, first + count)]
    )


def test_slices_views_and_pickles_are_the_lines_they_name() -> None:
    lines = rows(1, 10, random.Random(1))
    held = CopyLines.of(lines)
    assert len(held) == 10 and held.texts() == lines
    part = held[3:7]
    assert part.texts() == lines[3:7] and len(part) == 4
    assert bytes(part.view()) == "".join(lines[3:7]).encode()
    assert part[1:2].texts() == [lines[4]] and part.first_field() == "4"
    assert len(held[8:2]) == 0 and bytes(held[8:2].view()) == b""
    sent = pickle.loads(pickle.dumps(part))
    assert sent.texts() == lines[3:7] and sent == part and sent.lo == 0
    assert sent.body == bytes(part.view())  # a view sends its own bytes, not its whole body


def test_cut_and_steps_take_lines_in_order_across_pieces() -> None:
    rnd = random.Random(2)
    flat: list[str] = []
    pieces = []
    for _ in range(20):
        more = rows(len(flat) + 1, rnd.randrange(0, 30), rnd)
        flat += more
        pieces.append(CopyLines.of(more))
    for step in (1, 7, 64, 1000):
        got = [b"".join(p.view() for p in part) for part in steps(pieces, step)]
        assert got == ["".join(flat[i : i + step]).encode() for i in range(0, len(flat), step)]
    rest = list(pieces)
    first = cut(rest, 33)
    assert lines_in(first) == 33 and lines_in(rest) == len(flat) - 33
    assert [t for p in first + rest for t in p.texts()] == flat


@pytest.mark.parametrize("seed", range(3))
def test_a_router_cuts_the_batches_the_lines_one_by_one_gave(seed: int) -> None:
    """Pieces of random sizes for two partitions, a batch of 50 lines: every message is the
    one ``encode_copy_lines`` made of the same lines, the last ones flushed as they are."""
    rnd = random.Random(seed)
    router = BatchRouter(("id",), 2, 50, 1 << 20, COLUMNS, ranges=1 << 20)
    flat: list[list[str]] = [[], []]
    sent: list[list[bytes]] = [[], []]
    for _ in range(40):
        for p in (0, 1):
            more = rows(len(flat[p]) + 1, rnd.randrange(0, 80), rnd)
            flat[p] += more
            for batch in router.add_lines(p, CopyLines.of(more)):
                sent[p] += [value for _, value in router.encode("r", batch)]
    for p, rest in enumerate(router.buffers):
        if rest:
            sent[p] += [value for _, value in router.encode("r", rest)]
    for p in (0, 1):
        assert sent[p] == [
            encode_copy_lines(COLUMNS, flat[p][i : i + 50]) for i in range(0, len(flat[p]), 50)
        ]
    assert router.seq == sum(map(len, sent))


def test_a_batch_too_large_for_a_message_is_sent_in_smaller_ones() -> None:
    lines = rows(1, 40, random.Random(4))
    size = len(encode_copy_lines(COLUMNS, lines))
    router = BatchRouter(("id",), 1, 40, size // 3, COLUMNS, ranges=1 << 20)
    (batch,) = router.add_lines(0, CopyLines.of(lines))
    values = [value for _, value in router.encode("r", batch)]
    assert len(values) > 3 and all(len(v) <= size // 3 for v in values)
    numbers = [r["_sluice_row"] for v in values for r in decode_copy_rows(v[len(COPY_BATCH) :])]
    assert numbers == list(range(1, 41))
    assert router.limit < 40  # the next batches are cut smaller


def test_a_single_line_too_large_names_its_row() -> None:
    line = copy_lines([["17", "0", "k", "x" * 500]])
    router = BatchRouter(("id",), 1, 10, 200, COLUMNS, ranges=1 << 20)
    with pytest.raises(FileFormatError, match="row 17 is larger than the 200-byte"):
        list(router.encode("r", [CopyLines.of(line)]))
