"""Launch a worker script as two gloo ranks (separate processes) and collect their stdout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_two_ranks(script: str | Path, timeout: float = 300) -> list[str]:
    """Run `python script RANK` for ranks 0 and 1 at once; each must exit 0. Returns their stdouts."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, err
        outs.append(out)
    return outs
