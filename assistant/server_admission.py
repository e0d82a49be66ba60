"""Admission for the server: how many requests may wait or run at once; beyond that, 429 at once."""

from __future__ import annotations

import threading


class Admission:
    """Counts requests waiting or running; refuses beyond `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0
        self._lock = threading.Lock()

    @property
    def full(self) -> bool:
        return self.active >= self.limit

    def enter(self) -> Slot | None:
        with self._lock:
            if self.active >= self.limit:
                return None
            self.active += 1
        return Slot(self)

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1


class Slot:
    """One admitted request; `release` is idempotent, so every exit path may call it."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._leave()
