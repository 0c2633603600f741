"""Start or join a Ray cluster for a run: local by default, `ray.address` for a cluster."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from ifbatch.configs.schema import RayConfig


@contextlib.contextmanager
def ray_session(rc: RayConfig) -> Iterator[None]:
    """Reuse a Ray session already initialised by the caller (tests, notebooks); else start one and stop it after."""
    import ray

    if ray.is_initialized():
        yield
        return
    kwargs: dict = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    if rc.address:
        kwargs["address"] = rc.address
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster needs no token
        kwargs.update(num_cpus=rc.num_cpus, num_gpus=rc.num_gpus)
        if rc.object_store_gb:
            kwargs["object_store_memory"] = int(rc.object_store_gb * 2**30)
    ray.init(**kwargs)
    try:
        yield
    finally:
        ray.shutdown()
