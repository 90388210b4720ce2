"""A small progress bar on stderr, drawn only when stderr is a terminal."""

from __future__ import annotations

import os
import sys
import time


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


class Progress:
    """``with Progress(total, "create") as p: p.update(n)``; silent unless stderr is a TTY."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool | None = None):
        self.total = max(0, int(total))
        self.label = label
        self.stream = stream or sys.stderr
        if enabled is None:
            try:
                enabled = self.stream.isatty()
            except (AttributeError, ValueError):
                enabled = False
        self.enabled = enabled
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()
        self._drawn = False

    def update(self, n: int) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            self._draw()

    __call__ = update  # an importer calls it once per file: no extra call layer

    def _draw(self) -> None:
        try:
            cols = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, AttributeError, ValueError):
            cols = 80
        elapsed = max(time.monotonic() - self._start, 1e-6)
        rate = self.done / elapsed
        if self.total:
            frac = min(1.0, self.done / self.total)
            text = f" {frac * 100:5.1f}% {_human(self.done)}/{_human(self.total)} {_human(rate)}/s"
        else:
            frac = 0.0
            text = f" {_human(self.done)} {_human(rate)}/s"
        width = max(10, cols - len(self.label) - len(text) - 4)
        filled = int(width * frac)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r{self.label} [{bar}]{text}"[: cols - 1])
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled and self._drawn:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
