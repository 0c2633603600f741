"""How a step's Ray actor starts: up at once, its models loading in a thread of their own (Ray Data then starts
every stage's actors without waiting for any load); what a load that fails, or a SIGTERM during it, comes to."""

from __future__ import annotations

import os
import re
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ifbatch.models.loading import ModelLoadError


def loads_apart(step: type) -> type:
    """The step as a Ray Data actor class that loads its models in a thread of its own: the actor is up once its
    process is, and its first batch waits for the load. Ray Data starts a stream's actor pools one after another,
    each waiting until its actors are up (wait_for_min_actors_s, which keeps a stage's replicas starting together),
    so with the load inside the constructor a run's start-up was every stage's load in turn; now the stages load at
    once. A load that fails raises on each of the actor's batches. (Same class name: Ray names the actors by it.)"""

    class Loading(step):
        def __init__(self, **kwargs):
            self._loaded, self._failed = threading.Event(), None

            def load():
                try:
                    step.__init__(self, **kwargs)
                except BaseException as e:  # noqa: BLE001  (raised again on each batch)
                    self._failed = e
                finally:
                    self._loaded.set()

            threading.Thread(target=load, name=f"load {step.__name__}", daemon=True).start()
            _quiet_exit_while(self._loaded)

        def __call__(self, batch):
            self._loaded.wait()
            if self._failed is not None:
                raise self._failed
            return step.__call__(self, batch)

    Loading.__name__ = Loading.__qualname__ = step.__name__
    return Loading


def _quiet_exit_while(loaded: threading.Event) -> None:
    """A SIGTERM to the actor (`ray stop`, a node drained or removed) while it loads: leave at once. Ray's own
    handler starts a graceful exit, which then aborts with a C++ stack dump in the worker's log (forwarded to the
    driver's terminal) when a load is under way -- in the constructor as before, or in the load thread. Nothing is
    lost: no batch runs before the load ends. Once loaded, Ray's handler as before. (Only the main thread may set
    a handler: elsewhere, Ray's stays.)"""
    import ray

    if not (ray.is_initialized() and ray.get_runtime_context().get_actor_id()):
        return  # not an actor (a test calling the class in its own process)
    try:
        ray_handler = signal.getsignal(signal.SIGTERM)

        def on_sigterm(signum, frame):
            if not loaded.is_set():
                os._exit(128 + signum)
            if callable(ray_handler):
                ray_handler(signum, frame)
            elif ray_handler != signal.SIG_IGN:
                os._exit(128 + signum)

        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        pass


LOAD_FAILED = re.compile(r"ModelLoadError: (.+)")


def load_failure(error: BaseException) -> ModelLoadError | None:
    """The ModelLoadError of a stage whose models did not load (loads_apart), which reaches the driver only as the
    text of Ray Data's UserCodeException (the chain of causes stays in the actor): said as itself, in one line."""
    from ifbatch.models.loading import ModelLoadError  # (torch: not in a writer's import, test_layout)

    found = LOAD_FAILED.findall(str(error))
    return ModelLoadError(found[-1].strip()) if found else None
