"""Dynamic micro-batching: concurrent requests for one model are grouped up to `max_batch_size` inputs (those
queued while the model ran, and with `max_wait_ms` those arriving within that wait), run together off the
event loop in the model's own thread, and each caller gets its own slice of the results (a group that fails is run again request by request, so one caller's bad input fails only that
caller). Requests with different options (a `top_k`, an aggregation, generation settings) never share a
group, so a batch is always one `predict` call."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field


@dataclass
class _Job:
    items: list
    options: dict
    future: asyncio.Future
    key: str = field(init=False)

    def __post_init__(self):
        self.key = json.dumps(self.options, sort_keys=True, default=str)


class MicroBatcher:
    def __init__(self, run_batch: Callable[[list, dict], list], executor: Executor, max_batch_size: int, max_wait_ms: float,
                 observe: Callable[[int], None] = lambda size: None):
        self._run_batch = run_batch
        self._executor = executor
        self._max_batch_size = max_batch_size
        self._max_wait = max_wait_ms / 1000
        self._observe = observe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None
        self._carried: _Job | None = None

    async def submit(self, items: list, options: dict) -> list:
        """This request's results, in order; its exception if its group failed."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._loop is not loop:  # bound to the loop serving (a test client may bring a new one)
            self._loop, self._queue, self._carried = loop, asyncio.Queue(), None
            self._worker = asyncio.create_task(self._work())
        job = _Job(list(items), dict(options), loop.create_future())
        await self._queue.put(job)
        return await job.future

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def _work(self) -> None:
        while True:
            group = await self._group()
            await self._run(group)

    async def _group(self) -> list[_Job]:
        """The next job, then every job that arrives within the wait, fits the batch and has the same options."""
        first = self._carried or await self._queue.get()
        self._carried = None
        group, size = [first], len(first.items)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._max_wait
        while size < self._max_batch_size:
            left = deadline - loop.time()
            if left <= 0 and self._queue.empty():
                break
            try:
                job = self._queue.get_nowait() if left <= 0 else await asyncio.wait_for(self._queue.get(), left)
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                break
            if job.key != first.key or size + len(job.items) > self._max_batch_size:
                self._carried = job  # starts the next group
                break
            group.append(job)
            size += len(job.items)
        return group

    async def _run(self, group: list[_Job]) -> None:
        live = [job for job in group if not job.future.done()]  # a caller that timed out or left is not waited for
        if not live:
            return
        items = [item for job in live for item in job.items]
        self._observe(len(items))
        try:
            results = await self._call(items, live[0].options)
        except Exception as err:
            if len(live) == 1:
                live[0].future.set_exception(err)
                return
            for job in live:  # one caller's bad input must not fail the others: each alone, its own answer
                await self._run([job])
            return
        start = 0
        for job in live:
            if not job.future.done():
                job.future.set_result(results[start:start + len(job.items)])
            start += len(job.items)

    async def _call(self, items: list, options: dict) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, items, options)
