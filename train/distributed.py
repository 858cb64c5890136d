"""JAX process setup that must happen before any backend starts: virtual CPU devices, the
persistent compilation cache, and `jax.distributed.initialize` for multi-process runs.

`mesh.distributed`:
  "off"   single process.
  "on"    always initialize: with `mesh.coordinator_address` / `num_processes` / `process_id`
          when given, otherwise JAX's cluster auto-detection (Cloud TPU, SLURM, Open MPI, ...).
  "auto"  (default) initialize when a coordinator address is configured or a multi-process
          cluster is detected from its environment (a multi-host Cloud TPU slice, SLURM with more
          than one task, Open MPI with more than one rank); otherwise single process.
"""
from __future__ import annotations

import os

import jax


def _cluster_detected() -> bool:
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def should_initialize(mesh_cfg) -> bool:
    mode = mesh_cfg.distributed
    if mode == "off":
        return False
    if mode == "on":
        return True
    return bool(mesh_cfg.coordinator_address) or _cluster_detected()


def setup(cfg) -> None:
    """Configure JAX for this process (call once, before any JAX computation)."""
    m = cfg.mesh
    if m.num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(m.num_cpu_devices))
    cache = cfg.train.compilation_cache_dir
    if cache:
        path = os.path.abspath(os.path.expanduser(cache))
        os.makedirs(path, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    if should_initialize(m) and not is_initialized():
        kwargs = dict(initialization_timeout=int(m.init_timeout_s))
        if m.coordinator_address:
            kwargs["coordinator_address"] = m.coordinator_address
        if m.num_processes:
            kwargs["num_processes"] = int(m.num_processes)
        if m.process_id >= 0:
            kwargs["process_id"] = int(m.process_id)
        jax.distributed.initialize(**kwargs)


def is_initialized() -> bool:
    try:
        from jax._src import distributed as _d
        return _d.global_state.client is not None
    except Exception:  # pragma: no cover - private API moved
        return False
