"""distill.jobs: independent jobs side by side in spawned processes with a fixed thread count."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distill.jobs import default_workers, shutdown_workers, side_by_side


def _threads_and_value(x: int) -> tuple[int, int]:
    import torch
    return torch.get_num_threads(), x * x


def _write_or_fail(path: str, fail: bool) -> str:
    if fail:
        raise ValueError("job broke")
    import time
    time.sleep(0.5)         # ends after the failing job: its work must still be done
    open(path, "w").write("done")
    return path


def test_jobs_run_side_by_side_with_one_thread_each_in_job_order():
    results = side_by_side([(_threads_and_value, (k,), {}) for k in range(3)], workers=2, threads=1)
    assert results == [(1, 0), (1, 1), (1, 4)]
    assert side_by_side([(_threads_and_value, (5,), {})], workers=1)[0][1] == 25   # in this process
    assert default_workers(1) == 1 and 1 <= default_workers(8) <= 2


def test_a_failed_job_is_raised_after_the_others_have_finished(tmp_path):
    out = tmp_path / "kept.txt"
    seen = []
    with pytest.raises(ValueError, match="job broke"):
        side_by_side([(_write_or_fail, ("-", True), {}), (_write_or_fail, (str(out), False), {})], workers=2,
                     on_done=lambda i, s: seen.append(i))
    assert out.read_text() == "done" and sorted(seen) == [0, 1]


def _pid(_: int) -> int:
    import os
    return os.getpid()


def _die(_: int) -> None:
    import os
    os._exit(3)


def test_workers_are_reused_across_calls_and_replaced_when_one_dies():
    import multiprocessing
    side_by_side([(_pid, (k,), {}) for k in range(4)], workers=2)
    alive = {p.pid for p in multiprocessing.active_children()}
    again = set(side_by_side([(_pid, (k,), {}) for k in range(4)], workers=2))
    assert again and again <= alive                     # no process started for the second call
    with pytest.raises(Exception):                      # a worker that dies breaks that pool ...
        side_by_side([(_die, (0,), {}), (_pid, (1,), {})], workers=2)
    fresh = set(side_by_side([(_pid, (k,), {}) for k in range(2)], workers=2))
    assert fresh and fresh.isdisjoint(alive)            # ... and the next call starts new workers
    shutdown_workers()
    assert set(side_by_side([(_pid, (k,), {}) for k in range(2)], workers=2)).isdisjoint(fresh)
    shutdown_workers()


PARENT = '''
import os, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from distill.jobs import side_by_side


def job(folder):
    Path(folder, str(os.getpid())).touch()
    time.sleep(30)
    Path(folder, "finished").touch()


if __name__ == "__main__":
    side_by_side([(job, ({folder!r},), {{}})] * 2, workers=2)
'''


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie lingers where PID 1 does not reap)."""
    if not Path("/proc/self/stat").is_file():   # no procfs: a zombie counts as running here
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_end_with_a_killed_parent(tmp_path):
    """A parent killed by a signal runs no exit handler; its workers must not finish their jobs and write
    into run folders that a resumed run is already using."""
    folder = tmp_path / "jobs"
    folder.mkdir()
    script = tmp_path / "parent.py"
    script.write_text(PARENT.format(repo=str(Path(__file__).resolve().parents[1]), folder=str(folder)))
    parent = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 120
    while len(pids := [int(p.name) for p in folder.iterdir() if p.name.isdigit()]) < 2:
        assert parent.poll() is None and time.time() < deadline, "the workers never started their jobs"
        time.sleep(0.2)
    parent.kill()
    parent.wait()
    try:
        deadline = time.time() + 15
        while any(_running(p) for p in pids):
            assert time.time() < deadline, "a worker outlived its killed parent"
            time.sleep(0.2)
        assert not (folder / "finished").exists()
    finally:   # never leave an orphan behind, even when the check fails
        for pid in filter(_running, pids):
            os.kill(pid, signal.SIGKILL)
