"""Training metrics: ``WORKDIR/metrics.jsonl`` (one JSON object per logged step), TensorBoard event
files and a tqdm progress bar. Only process 0 writes."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm


class MetricsWriter:
    def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._jsonl = None
        self._tb = None
        self._bar = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        _drop_rows_after(path, initial_step)  # rows a killed run logged after its last checkpoint
        self._jsonl = open(path, "a")
        # Deliberately lazy: tensorboardX imports torch whenever it is installed (the dev environment).
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self._bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = np.asarray(v)
            row[k] = v.item() if v.ndim == 0 else v.tolist()
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, step)
        shown = {k: f"{row[k]:.4g}" for k in ("loss", "grad_norm", "lr") if k in row}
        self._bar.set_postfix(shown, refresh=False)

    def image(self, tag: str, step: int, image: np.ndarray) -> None:
        """An (H, W, 3) uint8 picture in TensorBoard's images tab (the trainer's samples)."""
        if self.enabled:
            self._tb.add_image(tag, np.asarray(image), step, dataformats="HWC")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if not self.enabled:
            return
        self._bar.close()
        self._tb.close()
        self._jsonl.close()


def _drop_rows_after(path: str, step: int) -> None:
    """Keeps only rows with ``step <= step`` so a resumed run's log has each step exactly once."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip()]
    kept = []
    for line in rows:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError):  # a line cut short by a kill
            continue
    if len(kept) != len(rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class StepTimer:
    """Wall time per step between logging points (device work is synchronised by the caller)."""

    def __init__(self):
        self._t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self._t = now - self._t, now
        return dt
