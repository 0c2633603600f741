"""Progress of a run: images done, images/s and ETA, pushed to whoever listens (the CLI's bar, Prefect's logs)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

Listener = Callable[["Progress"], None]
_listeners: list[Listener] = []


@dataclass
class Progress:
    done: int
    failed: int
    total: int
    started: float

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def rate(self) -> float:
        return (self.done + self.failed) / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        left = self.total - self.done - self.failed
        return left / self.rate if self.rate > 0 else None

    def line(self) -> str:
        eta = "?" if self.eta is None else f"{self.eta:.0f}s"
        done = self.done + self.failed
        return f"{done}/{self.total} images ({self.failed} failed), {self.rate:.2f} images/s, ETA {eta}"


def listen(fn: Listener) -> Callable[[], None]:
    """Register a listener; returns the function that removes it."""
    _listeners.append(fn)
    return lambda: _listeners.remove(fn) if fn in _listeners else None


def report(p: Progress) -> None:
    for fn in list(_listeners):
        fn(p)
