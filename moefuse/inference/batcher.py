"""Dynamic batching for the server: concurrent requests are queued and run through the model together.

    batcher = DynamicBatcher(run_batch, max_batch_size=32, max_wait_s=0.005, max_queue=256)
    await batcher.start()              # inside the event loop
    result = await batcher.submit(x)   # many coroutines at once; each gets its own result
    await batcher.stop()

One background task takes the first waiting item, then whatever else arrives within `max_wait_s`, up to
`max_batch_size`, and calls `run_batch(items) -> results` (one result per item, in order) in a single worker
thread: the model runs in one place, one batch at a time, while the event loop keeps accepting and decoding
requests. The queue is bounded: `submit` raises `QueueFull` when `max_queue` items wait, so a flood of requests
is refused instead of held in memory (the same policy as Triton's and TorchServe's dynamic batchers). A batch
that fails is rerun item by item, so an item that cannot be run fails alone: every other caller of the batch
still gets its result, and only that item's caller gets the exception.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class QueueFull(Exception):
    """More requests are waiting than the batcher holds."""


class DynamicBatcher:
    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], max_batch_size: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 256):
        if max_batch_size < 1 or max_wait_s < 0 or max_queue < 1:
            raise ValueError(f"max_batch_size and max_queue must be >= 1 and max_wait_s >= 0, got "
                             f"{max_batch_size}, {max_queue}, {max_wait_s}")
        self.run_batch, self.max_batch_size, self.max_wait_s = run_batch, max_batch_size, max_wait_s
        self.queue: asyncio.Queue = asyncio.Queue(max_queue)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="moefuse-model")
        self.task: asyncio.Task | None = None
        self.batch_sizes: list[int] = []  # what ran, for /info and the tests (the last 1000 batches)

    async def start(self) -> None:
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)

    async def submit(self, item: Any) -> Any:
        """The result of `item`, once its batch has run; the exception of running it alone if it failed."""
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.queue.maxsize} requests are already waiting") from None
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        """The first waiting item and whatever else arrives within max_wait_s, up to max_batch_size."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except TimeoutError:
                break
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [(item, fut) for item, fut in await self._collect() if not fut.done()]  # drop timed-out ones
            if not batch:
                continue
            self.batch_sizes = [*self.batch_sizes[-999:], len(batch)]
            try:
                results = await loop.run_in_executor(self.executor, self._run, [item for item, _ in batch])
            except Exception:  # one item may have failed it: rerun each alone, so only that item's caller fails
                await self._one_by_one(batch)
                continue
            for (_, fut), result in zip(batch, results):
                if not fut.done():
                    fut.set_result(result)

    async def _one_by_one(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        loop = asyncio.get_running_loop()
        for item, fut in batch:
            if fut.done():  # its caller has gone (timed out)
                continue
            try:
                result = (await loop.run_in_executor(self.executor, self._run, [item]))[0]
            except Exception as e:
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)

    def _run(self, items: list[Any]) -> list[Any]:
        """run_batch(items), held to its contract: one result per item."""
        results = list(self.run_batch(items))
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        return results
