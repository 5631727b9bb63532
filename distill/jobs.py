"""Independent CPU jobs side by side: a few spawned processes, a fixed number of torch threads each.

    side_by_side([(fn, args, kwargs), ...], workers=2, threads=1, on_done=print) -> [result, ...]

The mini-world's trainings are too small for torch's intra-op threads to scale: on a 2-core box two
200-step distillations with one thread each took 55.6 s together, one with two threads 53.8 s (idle
2-core AMD EPYC, one run), so running independent arms two at a time nearly halves their wall time.
Every job gets the same thread count whatever runs beside it, so its floats do not depend on the
scheduling. A failed job does not stop the others (their work is kept); the first failure is raised
once all have ended. `workers <= 1` runs the jobs here, one after the other, with this process's threads.

The worker processes outlive a call: the next call with the same (workers, threads) reuses them, since
a fresh worker spends about 6 s importing torch, transformers and the models' code before its first
job, and the quickstart with `--ablations` makes seven calls. `shutdown_workers()` ends them (also at exit);
a pool whose worker died, or a call interrupted, is not reused. A worker ends with its parent: a parent
killed by a signal runs no exit handler, and its workers would otherwise finish their jobs and write into
run folders that the resumed run is already using.
"""
from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.connection
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

Job = tuple[Callable, tuple, dict]


def default_workers(jobs: int) -> int:
    """Two jobs at a time on a machine with at least two cores, never more than there are jobs."""
    return max(1, min(jobs, 2, os.cpu_count() or 1))


_POOLS: dict[tuple[int, int], ProcessPoolExecutor] = {}   # (workers, threads) -> its live pool


def _pool(workers: int, threads: int) -> ProcessPoolExecutor:
    if (workers, threads) not in _POOLS:
        _POOLS[(workers, threads)] = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(threads,))
    return _POOLS[(workers, threads)]


def _discard(workers: int, threads: int) -> None:
    pool = _POOLS.pop((workers, threads), None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def shutdown_workers() -> None:
    """End the worker processes `side_by_side` keeps."""
    while _POOLS:
        _POOLS.popitem()[1].shutdown(wait=True, cancel_futures=True)


atexit.register(shutdown_workers)


def _init_worker(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def _exit_with_parent() -> None:
    """Wait for the parent process to end, then end this worker at once (its job's files are written
    atomically and checkpointed, so this is the same as the kill the parent got)."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def side_by_side(jobs: list[Job], workers: int, threads: int = 1,
                 on_done: Callable[[int, float], None] | None = None) -> list[Any]:
    """Run `jobs` (picklable `(fn, args, kwargs)`) in `workers` spawned processes of `threads` torch
    threads each; returns their results in job order. `on_done(index, seconds)` is called as each ends."""
    if workers <= 1 or len(jobs) <= 1:
        results = []
        for i, (fn, args, kwargs) in enumerate(jobs):
            t0 = time.perf_counter()
            results.append(fn(*args, **kwargs))
            if on_done:
                on_done(i, time.perf_counter() - t0)
        return results
    results: list[Any] = [None] * len(jobs)
    errors: list[tuple[int, BaseException]] = []
    pool = _pool(workers, threads)
    t0 = time.perf_counter()
    futures = {pool.submit(_timed, fn, args, kwargs): i for i, (fn, args, kwargs) in enumerate(jobs)}
    try:
        for fut in as_completed(futures):
            i = futures[fut]
            try:
                results[i], seconds = fut.result()
            except Exception as e:   # the others go on: their work is not lost
                errors.append((i, e))
                seconds = time.perf_counter() - t0
            if on_done:
                on_done(i, seconds)
    except BaseException:
        _discard(workers, threads)
        raise
    if any(isinstance(e, BrokenProcessPool) for _, e in errors):   # a worker died: start afresh next time
        _discard(workers, threads)
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return results


def _timed(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0
