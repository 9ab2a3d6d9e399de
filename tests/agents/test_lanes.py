"""Lanes: in order within a lane, side by side across lanes, bounded."""

from __future__ import annotations

import asyncio

from sluice.agents.lanes import Lanes


async def test_items_of_a_lane_run_in_order_and_lanes_run_side_by_side() -> None:
    done: list[tuple[str, int]] = []
    running: set[str] = set()
    overlap: list[set[str]] = []

    async def work(item: tuple[str, int]) -> None:
        lane, n = item
        running.add(lane)
        overlap.append(set(running))
        await asyncio.sleep(0.01 * (3 - n))  # earlier items take longer: order must still hold
        running.discard(lane)
        done.append(item)

    lanes: Lanes[tuple[str, int]] = Lanes(work, depth=2)
    for n in range(3):
        for lane in ("a", "b"):
            await lanes.put(lane, (lane, n))
    await lanes.join()
    await lanes.close()
    assert [n for lane, n in done if lane == "a"] == [0, 1, 2]
    assert [n for lane, n in done if lane == "b"] == [0, 1, 2]
    assert {"a", "b"} in overlap  # the two lanes worked at the same time


async def test_put_waits_while_a_lane_is_full() -> None:
    release = asyncio.Event()

    async def work(item: int) -> None:
        await release.wait()

    lanes: Lanes[int] = Lanes(work, depth=1)
    await lanes.put(0, 1)  # taken by the lane's task
    await asyncio.sleep(0)
    await lanes.put(0, 2)  # waits in the queue
    blocked = asyncio.create_task(lanes.put(0, 3))
    await asyncio.sleep(0.05)
    assert not blocked.done()
    await lanes.put(1, 4)  # another lane is not held up
    release.set()
    await asyncio.wait_for(blocked, 1)
    await lanes.join()
    await lanes.close()


async def test_work_that_fails_is_tried_again_before_the_next_item() -> None:
    seen: list[int] = []
    failures = {1: 2}  # item 1 fails twice

    async def work(item: int) -> None:
        seen.append(item)
        if failures.get(item):
            failures[item] -= 1
            raise RuntimeError("boom")

    lanes: Lanes[int] = Lanes(work, retry_delay=0.01)
    for item in (1, 2, 3):
        await lanes.put("x", item)
    await asyncio.wait_for(lanes.join(), 1)
    await lanes.close()
    assert seen == [1, 1, 1, 2, 3]
