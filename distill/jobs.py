"""Independent CPU jobs side by side: a few spawned processes, a fixed number of torch threads each.

    side_by_side([(fn, args, kwargs), ...], workers=2, threads=1, on_done=print) -> [result, ...]

The mini-world's trainings are too small for torch's intra-op threads to scale: on a 2-core box two
200-step distillations with one thread each took 55.6 s together, one with two threads 53.8 s (idle
2-core AMD EPYC, one run), so running independent arms two at a time nearly halves their wall time.
Every job gets the same thread count whatever runs beside it, so its floats do not depend on the
scheduling. A failed job does not stop the others (their work is kept); the first failure is raised
once all have ended. `workers <= 1` runs the jobs here, one after the other, with this process's threads.
"""
from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable

Job = tuple[Callable, tuple, dict]


def default_workers(jobs: int) -> int:
    """Two jobs at a time on a machine with at least two cores, never more than there are jobs."""
    return max(1, min(jobs, 2, os.cpu_count() or 1))


def _set_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)


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
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_set_threads, initargs=(threads,)) as pool:
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
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if errors:
        raise min(errors, key=lambda e: e[0])[1]
    return results


def _timed(fn: Callable, args: tuple, kwargs: dict) -> tuple[Any, float]:
    t0 = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - t0
