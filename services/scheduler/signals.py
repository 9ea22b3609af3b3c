"""Signals from the first instant of the process, before the slow imports of start-up.

A daemon that dies of SIGTERM or SIGHUP while it is still importing (the default action) is
what `systemctl reload` right after a start, or a quick stop, would otherwise meet. Here a
stop is remembered and honoured once start-up has made it safe (exit 0), a reload is honoured
once there is a job table to reload, and neither ever runs the default action. Only the
standard library is imported, so installing costs nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

STOPS = (signal.SIGTERM, signal.SIGINT)


class ProcessSignals:
    """SIGTERM/SIGINT (stop) and SIGHUP (reload), remembered until someone takes them over."""

    def __init__(self) -> None:
        self.stop_requested: str | None = None  # the name of the first stop signal
        self.reload_requested = False
        self._on_stop: Callable[[str], None] | None = None
        self._on_reload: Callable[[], None] | None = None
        self._previous: dict[int, object] = {}
        self._lock = threading.Lock()

    @classmethod
    def install(cls) -> ProcessSignals:
        signals = cls()
        for signum in (*STOPS, signal.SIGHUP):
            signals._previous[signum] = signal.signal(signum, signals._handle)
        return signals

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        with self._lock:
            if signum == signal.SIGHUP:
                self.reload_requested = True
                on_reload, on_stop = self._on_reload, None
            else:
                name = signal.Signals(signum).name
                self.stop_requested = self.stop_requested or name
                on_reload, on_stop = None, self._on_stop
        if on_stop is not None:
            on_stop(signal.Signals(signum).name)
        if on_reload is not None:
            on_reload()

    def attach(
        self, *, on_stop: Callable[[str], None], on_reload: Callable[[], None] | None
    ) -> None:
        """From now on signals go to these; one that came before is delivered at once. A
        SIGHUP with nothing to reload is ignored."""
        with self._lock:
            self._on_stop, self._on_reload = on_stop, on_reload
            stop, reload = self.stop_requested, self.reload_requested
            self.reload_requested = False
        if stop is not None:
            on_stop(stop)
        if reload and on_reload is not None:
            on_reload()

    def detach(self) -> None:
        with self._lock:
            self._on_stop = self._on_reload = None

    def restore(self) -> None:
        """Put back the handlers that were there before `install`."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def exit_code(self) -> int | None:
        """For a command that is not a daemon: the exit status a stop during start-up
        means (128 + the signal, as the shell reports it), or None."""
        if self.stop_requested is None:
            return None
        return 128 + int(signal.Signals[self.stop_requested])
