"""One batched model call run as up to N parts at once, each part some of the batch's rows on a thread of its own.

Why not onnxruntime's intra-op threads: they split every operator and join after each one, ~100 joins per step of
MobileNetV2-TSM. Where the capture threads decode and preprocess on the same few cores, a join waits for a pool
thread that was descheduled, and a step with 2 threads on 2 cores took longer than the frame period it ran in
with 1 (docs/benchmarks.md, "Live streams per process"). A part is a whole call over rows [lo, hi) on one thread,
so a step has one join. onnxruntime's ``InferenceSession.run`` releases the GIL and a session takes concurrent
calls, so the parts share one session and one copy of the weights.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

Call = Callable[[int, int], Sequence[np.ndarray]]


def default_shards() -> int:
    """2 on a 2-core machine, 1 elsewhere.

    On 2 cores the model gets one intra-op thread (see ``default_threads``: the other core is the capture
    threads'), so a batched step uses one core however many streams wait; a second part uses the other core
    whenever capture leaves it idle. With more cores the intra-op threads already have cores of their own.
    """
    return 2 if (os.cpu_count() or 1) == 2 else 1


def shard_bounds(batch: int, shards: int) -> list[tuple[int, int]]:
    """Row ranges [lo, hi) of up to ``shards`` parts as even as possible, in order; none empty."""
    n = max(1, min(shards, batch))
    cuts = [batch * i // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


class ShardedCalls:
    """Runs ``call(lo, hi)`` over a batch's rows in up to ``shards`` parts at once and concatenates the results.

    The first part runs on the calling thread, the others on a pool of ``shards - 1`` threads. A call returns a
    sequence of arrays whose first axis is its rows; :meth:`run` returns them concatenated along that axis. Every
    part has ended before :meth:`run` returns or raises (none still reads the inputs); the first error is raised.
    """

    def __init__(self, shards: int, name: str = "model-shard") -> None:
        if not isinstance(shards, int) or shards < 1:
            raise ValueError(f"shards must be an integer >= 1, got {shards!r}")
        self.shards = shards
        self._pool = ThreadPoolExecutor(shards - 1, thread_name_prefix=name) if shards > 1 else None

    def run(self, call: Call, batch: int) -> list[np.ndarray]:
        pool = self._pool
        parts = shard_bounds(batch, self.shards)
        if pool is None or len(parts) == 1:
            return list(call(0, batch))
        futures = [pool.submit(call, lo, hi) for lo, hi in parts[1:]]
        results, error = [], None
        try:
            results.append(call(*parts[0]))
        except BaseException as e:  # noqa: BLE001 (re-raised below, once the other parts have ended)
            error = e
        for future in futures:
            try:
                results.append(future.result())
            except BaseException as e:  # noqa: BLE001
                error = error or e
        if error is not None:
            raise error
        return [np.concatenate(columns, 0) for columns in zip(*results)]

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
