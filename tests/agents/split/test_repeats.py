"""Keys repeated inside one file: counted exactly in memory and once the hashes spill to their
bucket files, and reported in the run's summary."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sluice.agents.split import repeats
from sluice.agents.split.repeats import RepeatCounter, Repeats, winner
from sluice.cli.common import _provenance
from sluice.schemas.runs import DuplicatePolicy


def truth(keys: list[str]) -> Repeats:
    counts = Counter(keys)
    return Repeats(
        keys=sum(1 for n in counts.values() if n > 1),
        rows=sum(n - 1 for n in counts.values()),
    )


@pytest.mark.parametrize("run", [1 << 18, 7, 1000])
@pytest.mark.parametrize("n", [0, 1, 2, 5, 1000, 50_000])
def test_counts_equal_a_full_count_in_memory_and_spilled(
    monkeypatch: pytest.MonkeyPatch, run: int, n: int
) -> None:
    monkeypatch.setattr(repeats, "RUN", run)
    rnd = random.Random(n)
    keys = [str(rnd.randrange(max(1, n // 3))) for _ in range(n)]
    counter = RepeatCounter()
    for start in range(0, n, 200):
        counter.add(keys[start : start + 200])
    assert counter.count() == truth(keys)


def test_a_counter_is_spent_after_counting() -> None:
    counter = RepeatCounter()
    counter.add(["a", "a", "b"])
    assert counter.count() == Repeats(keys=1, rows=1)
    assert counter.count() == Repeats(keys=0, rows=0)


def test_the_summary_says_how_many_keys_repeat_and_which_row_won() -> None:
    won = winner(DuplicatePolicy.UPSERT, None)
    provenance = {
        "format": "csv",
        "file": {"name": "a.csv", "size": 10},
        "repeated_keys": {"keys": 1200, "rows": 3400, "won": won},
    }
    assert _provenance(provenance)[-1] == (
        "  repeated keys: 1,200 keys occur in more than one row (3,400 rows lost to another);"
        " the table keeps the last row of each key in the file (policy upsert)"
    )
    provenance["repeated_keys"] = {"keys": 0, "rows": 0, "won": won}
    assert not any("repeated" in line for line in _provenance(provenance))
