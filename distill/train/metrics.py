"""Training metrics: one JSON line per logged step in OUT/metrics.jsonl, TensorBoard if installed."""
from __future__ import annotations

import json
import math
from pathlib import Path

from distill.io import write_text_atomic


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)          # JSON has no NaN/inf; keep them visible as strings
    return v


class MetricsWriter:
    def __init__(self, out_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.events_path = Path(out_dir) / "events.jsonl"
        self.enabled = enabled
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, rec: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in rec.items()}) + "\n")
            f.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, rec["step"])

    def event(self, rec: dict) -> None:
        if not self.enabled:
            return
        print(f"[amoe distill] {json.dumps({k: _clean(v) for k, v in rec.items()})}", flush=True)
        with open(self.events_path, "a") as f:
            f.write(json.dumps({k: _clean(v) for k, v in rec.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume: drop lines of steps after the checkpoint (they will be recomputed), in both the
        metrics and the events log, so neither holds a step twice."""
        if not self.enabled:
            return
        for path in (self.path, self.events_path):
            if not path.exists():
                continue
            keep = []
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= step:
                        keep.append(line)
                except json.JSONDecodeError:   # a line cut by a kill: drop it
                    continue
            write_text_atomic(path, "".join(line + "\n" for line in keep))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
