"""A bounded generation queue: one generation at a time on the loaded model, up to ``limit``
more waiting; past that a request is refused at once (HTTP 503 + Retry-After) instead of piling
up threads and memory. A request whose client hangs up while it waits is dropped when its turn
comes, without running. Also the progress the page polls."""

from __future__ import annotations

import contextlib
import threading
import time


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy; retry in {retry_after} s")
        self.retry_after = retry_after


class ClientGone(Exception):
    """The client of a waiting request hung up: it is dropped, not computed."""


class GenerationQueue:
    def __init__(self, limit: int):
        if limit < 0:
            raise ValueError(f"queue limit must be >= 0, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()      # guards the counters
        self._model = threading.Lock()     # the model: one generation at a time
        self.waiting = 0
        self.running = False
        self.step = 0
        self.total = 0
        self.done = 0
        self.dropped = 0                   # requests whose client left before their turn
        self.last_seconds = 5.0            # duration of the last generation, for Retry-After
        self.started = 0.0                 # perf_counter() when the running one started (A1111's ETA)
        self._interrupt = threading.Event()  # A1111's /interrupt: the running generation stops early

    def enter(self) -> None:
        """Take a place in the queue or raise QueueFull (admission is decided here, atomically)."""
        with self._lock:
            if self.waiting >= self.limit + 1:  # +1: the one running now also counts as "in"
                raise QueueFull(max(1, round(self.last_seconds * (self.waiting + 1))))
            self.waiting += 1

    @contextlib.contextmanager
    def run(self, total_steps: int, gone: threading.Event | None = None):
        """Hold the model for one generation (blocks while another runs); leave the queue after.
        ClientGone instead when ``gone`` is set by the time the model is free."""
        try:
            with self._model:
                if gone is not None and gone.is_set():  # nobody would read the result
                    with self._lock:
                        self.dropped += 1
                    raise ClientGone()
                with self._lock:
                    self.running, self.step, self.total = True, 0, total_steps
                    self._interrupt.clear()  # an interrupt sent while nothing ran is not for this one
                t0 = self.started = time.perf_counter()
                try:
                    yield self
                finally:
                    with self._lock:
                        self.running = False
                        self._interrupt.clear()  # it was for this one
                        self.done += 1
                        self.last_seconds = time.perf_counter() - t0
        finally:
            with self._lock:
                self.waiting -= 1

    def leave(self) -> None:
        """Give up a place taken with enter() without running (the request failed before running)."""
        with self._lock:
            self.waiting -= 1

    def on_step(self, i: int) -> None:
        self.step = i + 1

    def interrupt(self) -> None:
        """Stop the running generation after its current step (``interrupted`` is its ``stop``)."""
        with self._lock:
            if self.running:
                self._interrupt.set()

    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def status(self) -> dict:
        with self._lock:
            queued = self.waiting - (1 if self.running else 0)
            return {"running": self.running, "step": self.step, "total": self.total, "queued": max(0, queued),
                    "limit": self.limit, "done": self.done, "dropped": self.dropped}
