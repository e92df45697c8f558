"""Multi-process start-up: ``jax.distributed.initialize()`` exactly when the run spans several processes.

A multi-host JAX run (a TPU pod slice, several GPU nodes, or several CPU processes in a test) is one
program started once per host; before any device is touched, every process must join the same
distributed runtime so that ``jax.devices()`` lists the devices of all hosts. Single-host runs must
*not* call it: without a coordinator they would wait for one until the timeout.

``maybe_initialize(requested)`` decides from the environment (``requested=None``), or does what the
trainer's ``--distributed`` / ``--nodistributed`` flag says:

=========================  =====================================================================
environment                what happens
=========================  =====================================================================
``JAX_COORDINATOR_ADDRESS``  explicit: ``host:port`` of process 0, with ``JAX_NUM_PROCESSES`` and
+ ``JAX_NUM_PROCESSES``      ``JAX_PROCESS_ID`` (optionally ``JAX_LOCAL_DEVICE_IDS``); works anywhere,
+ ``JAX_PROCESS_ID``         CPU included (what tests/test_multihost.py uses)
SLURM, ``SLURM_NTASKS`` > 1  ``srun`` job step with several tasks: JAX reads the SLURM variables
TPU pod / GKE / xpk          ``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` with more than one
                             host, or ``MEGASCALE_COORDINATOR_ADDRESS`` (multi-slice)
Cloud TPU VM                 any TPU VM (libtpu present and TPU chips attached): JAX reads the worker
                             list from the VM metadata; harmless on a one-host slice
anything else               nothing: one process, no coordinator
=========================  =====================================================================

On CPU the cross-process collectives go through gloo (set explicitly; it is also JAX 0.10's default).
"""

from __future__ import annotations

import logging
import os

import jax

# Environment variables of the explicit launch (the JAX_COORDINATOR_ADDRESS name is JAX's own).
COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"
TIMEOUT_ENV = "JAX_DISTRIBUTED_TIMEOUT"  # seconds to wait for all processes (default 300)


def _host_count(var: str) -> int:
    value = os.environ.get(var, "")
    return len([h for h in value.split(",") if h.strip()])


def detect() -> str | None:
    """The multi-process environment this process runs in (a short name), or None for a single process."""
    env = os.environ
    if COORDINATOR_ENV in env and NUM_PROCESSES_ENV in env and PROCESS_ID_ENV in env:
        return "explicit" if int(env[NUM_PROCESSES_ENV]) > 1 else None
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if max(_host_count("TPU_WORKER_HOSTNAMES"), _host_count("TPU_PROCESS_ADDRESSES")) > 1:
        return "tpu-gke"
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu-multislice"
    if _on_cloud_tpu_vm():
        return "tpu-vm"
    return None


def _on_cloud_tpu_vm() -> bool:
    # JAX's own test for TPU chips on this host (it reads PCI device ids under /sys, so it cannot block
    # and never fires on CPU/GPU machines). JAX sets cloud_tpu_init.running_in_cloud_tpu_vm only once
    # the backend starts, which is too late here.
    try:
        from jax._src import hardware_utils  # private: guarded, see the except clause

        chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    except (ImportError, AttributeError, OSError):  # a future jax may move it; --distributed still works
        return False
    return chips > 0


def maybe_initialize(requested: bool | None = None) -> bool:
    """Joins the distributed runtime when requested (True) or detected (None); returns whether it did.

    Must run before anything touches devices (jax.devices(), array creation, jit). Idempotent.
    """
    kind = detect()
    if requested is False or (requested is None and kind is None):
        return False
    if jax.distributed.is_initialized():
        return True
    try:  # CPU processes exchange collectives through gloo (no-op for TPU/GPU backends)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # an older/newer jax without the option keeps its default
        pass
    kwargs = {"initialization_timeout": int(os.environ.get(TIMEOUT_ENV, "300"))}
    if kind == "explicit":
        kwargs.update(coordinator_address=os.environ[COORDINATOR_ENV],
                      num_processes=int(os.environ[NUM_PROCESSES_ENV]),
                      process_id=int(os.environ[PROCESS_ID_ENV]))
    logging.info("jax.distributed.initialize (%s)", kind or "requested")
    jax.distributed.initialize(**kwargs)  # the rest JAX detects itself (SLURM, TPU metadata, GKE)
    logging.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    return True
