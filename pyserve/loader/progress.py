"""Weight-loading progress: a live counter on a terminal, one log line otherwise
(so container logs get a summary, not a wall of carriage returns)."""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

log = logging.getLogger("pyserve.loader")


class LoadProgress:
    def __init__(self, what: str, total: int, stream: IO[str] | None = None):
        self.what = what
        self.total = total
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.perf_counter()
        self._last_draw = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if self.live and (now - self._last_draw > 0.05 or self.done == self.total):
            self._last_draw = now
            width = 30
            filled = width * self.done // max(self.total, 1)
            self.stream.write(f"\r{self.what} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total}")
            self.stream.flush()

    def close(self) -> None:
        elapsed = time.perf_counter() - self.start
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
        log.info("%s: %d tensors in %.2f s", self.what, self.done, elapsed)
