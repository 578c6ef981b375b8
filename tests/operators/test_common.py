"""operators/common.py: the per-object locks that serialise a resource's syncs."""

from __future__ import annotations

import asyncio

from operators import common


def test_a_lock_left_held_by_a_finished_event_loop_does_not_block_the_next_operator():
    """An operator stopped mid-sync leaves its lock held; one restarted in the same process (a new event
    loop, as in the emulator tests) must still sync that object rather than fail on a foreign lock."""

    async def hold_forever() -> None:
        await common.object_lock("tr", "default", "run").acquire()  # never released: the task was stopped

    asyncio.run(hold_forever())

    async def sync_once() -> bool:
        async with common.object_lock("tr", "default", "run"):
            return True

    assert asyncio.run(asyncio.wait_for(sync_once(), timeout=5))


def test_one_object_one_lock_within_an_operator_and_forgotten_on_delete():
    async def check() -> None:
        first = common.object_lock("mr", "team", "fim")
        assert common.object_lock("mr", "team", "fim") is first
        assert common.object_lock("mr", "team", "other") is not first
        common.forget_lock("mr", "team", "fim")
        assert common.object_lock("mr", "team", "fim") is not first

    asyncio.run(check())
