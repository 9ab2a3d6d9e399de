"""sluice.retries, the one retry policy: which failures use up tries, which are not retried, and
how long an error that says when to come back is waited for. Small real waits; the assertions
count tries, never time them."""

from __future__ import annotations

import pytest

from sluice import retries as retry
from sluice.errors import DatabaseUnavailable, InvalidRequest, SourceUnavailable
from sluice.retries import Policy, backoff, retrying

FAST = Policy(attempts=3, first=0.001, cap=0.002, outage=120.0)


class Flaky:
    """Raises the given errors in turn, then returns "done"; counts its calls."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


@pytest.fixture
def quick_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pause between looks at an unreachable database, made short for the test.
    monkeypatch.setattr(retry, "OUTAGE_PAUSE", 0.001)


async def test_a_database_outage_does_not_use_up_tries(quick_outage: None) -> None:
    work = Flaky(*(DatabaseUnavailable("down") for _ in range(6)), RuntimeError("once"))
    retried: list[None] = []
    assert await retrying("work", work, FAST, on_retry=lambda: retried.append(None)) == "done"
    # Six outage waits and one counted failure, with three tries allowed.
    assert work.calls == 8
    assert len(retried) == 7


async def test_failures_use_up_the_tries_then_the_last_one_propagates() -> None:
    work = Flaky(*(RuntimeError(f"failure {n}") for n in range(1, 5)))
    with pytest.raises(RuntimeError, match="failure 3"):
        await retrying("work", work, FAST)
    assert work.calls == 3


async def test_after_the_outage_budget_database_failures_count_as_tries(
    quick_outage: None,
) -> None:
    policy = Policy(attempts=2, first=0.001, cap=0.001, outage=0.0025)
    work = Flaky(*(DatabaseUnavailable(f"down {n}") for n in range(1, 10)))
    with pytest.raises(DatabaseUnavailable, match="down 5"):
        await retrying("work", work, policy)
    # Three free waits (0.001 s each, up to 0.0025 s), then two counted tries.
    assert work.calls == 5


async def test_a_terminal_error_is_not_retried() -> None:
    work = Flaky(InvalidRequest("wrong"))
    with pytest.raises(InvalidRequest, match="wrong"):
        await retrying("work", work, FAST)
    assert work.calls == 1


async def test_retry_on_narrows_what_is_retried() -> None:
    policy = Policy(attempts=5, first=0.001, retry_on=lambda e: isinstance(e, KeyError))
    work = Flaky(KeyError("a"), ValueError("b"))
    with pytest.raises(ValueError, match="b"):
        await retrying("work", work, policy)
    assert work.calls == 2


async def test_an_error_with_retry_after_is_waited_for_without_using_a_try() -> None:
    asked = [SourceUnavailable("HTTP 429", status=429, retry_after=0.001) for _ in range(5)]
    work = Flaky(*asked, RuntimeError("once"), RuntimeError("twice"))
    assert await retrying("work", work, FAST) == "done"
    assert work.calls == 8


def test_an_error_with_retry_after_waits_that_long() -> None:
    assert retry.retry_after(SourceUnavailable("HTTP 429", retry_after=7.5)) == 7.5
    assert retry.retry_after(SourceUnavailable("HTTP 503", status=503)) is None
    assert retry.retry_after(RuntimeError("no")) is None
    budget = retry._Budget(FAST)

    class State:
        attempt_number = 1

        class outcome:  # stands in for tenacity's Future
            failed = True

            @staticmethod
            def exception() -> BaseException:
                return SourceUnavailable("HTTP 429", retry_after=7.5)

    assert budget.wait(State()) == 7.5  # type: ignore[arg-type]
    assert budget.stop(State()) is False  # type: ignore[arg-type]
    assert budget.tries == 0


def test_backoff_doubles_up_to_the_cap_with_half_of_it_random() -> None:
    assert [backoff(n, first=1.0, cap=8.0, jitter=False) for n in range(1, 6)] == [1, 2, 4, 8, 8]
    for n in range(1, 6):
        full = min(8.0, 2.0 ** (n - 1))
        assert full / 2 <= backoff(n, first=1.0, cap=8.0) <= full
    assert backoff(100_000, first=0.5, cap=60.0, jitter=False) == 60.0


async def test_work_may_be_any_callable_returning_an_awaitable() -> None:
    work = Flaky(RuntimeError("once"))
    assert await retrying("work", lambda: work(), FAST) == "done"
    assert work.calls == 2


def test_the_python_apis_retry_is_still_the_function() -> None:
    # Importing the submodule must not shadow `sluice.retry(run_id)` of the Python API.
    import sluice
    import sluice.retries
    from sluice import sdk

    assert sluice.retry is sdk.retry
