"""``pkfuse restart-test``'s progress bar: one line on a terminal's stderr, redrawn in place.

``render`` is the line, a pure function of a ``State`` and the terminal's width (what the tests
check): a bar of the cycles done of all asked, then per flow ``done/asked``, the last cycle's
blackout, the failures so far, the time elapsed and the ETA (the mean time per cycle so far
times the cycles left, counting down between cycles; ``?`` before the first). It never reaches the last column (a line that
wraps cannot be redrawn with ``\\r``): the bar narrows, the words shorten (80 columns hold the
short form and a bar), then the bar goes and last the text is cut.

``ProgressBar`` draws it (``\\r``, the line, erase to the end of the line) after every cycle and
once a second in between, from a thread of its own (the elapsed time moves while a cycle runs),
and ``clear()`` erases it at the end, before the summary and any error line. It keeps the cycles
it was given and counts their failures at every draw: a cycle's DMA checks are made at the end of
its flow and the last one's guest at the final stop, so a cycle can fail after it was first shown. The command draws
one only when stderr is a terminal; otherwise nothing is printed per cycle.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from typing import Protocol, TextIO

BAR_MAX = 30  #: the bar's cells at most
BAR_MIN = 4  #: below this the bar is left out
TICK_S = 1.0  #: seconds between redraws while a cycle runs
ERASE = "\x1b[K"  #: erase to the end of the line (ANSI EL)


@dataclasses.dataclass
class State:
    """What the line shows: per flow the cycles asked (in run order) and done."""

    asked: dict[str, int]
    done: dict[str, int] = dataclasses.field(default_factory=dict)
    failures: int = 0
    last_blackout_s: float | None = None
    elapsed_s: float = 0.0

    done_at_s: float = 0.0  #: ``elapsed_s`` when the last cycle was done

    def eta_s(self) -> float | None:
        """The mean time per cycle up to the last one done, times the cycles left, less the time since."""
        n = sum(self.done.values())
        if n == 0:
            return None
        left = max(sum(self.asked.values()) - n, 0)
        return max(self.done_at_s / n * left - (self.elapsed_s - self.done_at_s), 0.0) if left else 0.0


def duration(seconds: float | None) -> str:
    """``?``, ``42s``, ``3m05s``, ``1h02m``."""
    if seconds is None:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def render(state: State, width: int) -> str:
    """The progress line for a terminal ``width`` columns wide: at most ``width - 1`` characters."""
    total = sum(state.asked.values())
    done = sum(state.done.values())
    flows = " ".join(f"{f} {state.done.get(f, 0)}/{n}" for f, n in state.asked.items())
    last = "-" if state.last_blackout_s is None else f"{state.last_blackout_s * 1e3:.0f} ms"
    elapsed, eta = duration(state.elapsed_s), duration(state.eta_s())
    texts = (f"{flows} | last blackout {last} | {state.failures} failed | {elapsed} elapsed, ETA {eta}",
             f"{flows} | last {last} | {state.failures} failed | {elapsed}, ETA {eta}")  # for 80 columns
    room = width - 1
    for text in texts:  # the bar first, in the words that leave it room
        cells = min(BAR_MAX, room - len(text) - 3)  # "[", "]", " "
        if cells >= BAR_MIN:
            full = cells * done // total if total else 0
            return f"[{'#' * full}{'-' * (cells - full)}] {text}"
    return next((t for t in texts if len(t) <= room), texts[-1][:max(room, 0)])


def terminal_width(stream: TextIO, fallback: int = 80) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns or fallback
    except (OSError, ValueError, AttributeError):
        return fallback


class CycleLike(Protocol):
    """What the bar reads of a ``pkfuse.harness.cycle.Cycle``."""

    flow: str

    @property
    def ok(self) -> bool: ...

    def blackout(self) -> dict[str, float]: ...


class ProgressBar:
    """The line on ``stream``, redrawn by ``cycle_done`` and every ``tick`` seconds until ``clear``."""

    def __init__(self, asked: dict[str, int], stream: TextIO, *, tick: float = TICK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.state = State(dict(asked), dict.fromkeys(asked, 0))
        self.stream = stream
        self.clock = clock
        self.t0 = clock()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._drawn = False
        self._cycles: list[CycleLike] = []
        self._ticker = threading.Thread(target=self._tick, args=(tick,), name="progress", daemon=True)

    def start(self) -> None:
        self.draw()
        self._ticker.start()

    def cycle_done(self, cycle: CycleLike) -> None:
        with self._lock:
            self._cycles.append(cycle)
            self.state.done[cycle.flow] = self.state.done.get(cycle.flow, 0) + 1
            self.state.done_at_s = self.clock() - self.t0
            blackout = cycle.blackout()
            if blackout:
                self.state.last_blackout_s = blackout["total"]
        self.draw()

    def draw(self) -> None:
        with self._lock:
            if self._stop.is_set():
                return
            self.state.elapsed_s = self.clock() - self.t0
            self.state.failures = sum(not c.ok for c in self._cycles)
            self.stream.write("\r" + render(self.state, terminal_width(self.stream)) + ERASE)
            self.stream.flush()
            self._drawn = True

    def clear(self) -> None:
        """Stop redrawing and erase the line (the cursor back at its start)."""
        with self._lock:
            self._stop.set()
            if self._drawn:
                self.stream.write("\r" + ERASE)
                self.stream.flush()
                self._drawn = False
        if self._ticker.is_alive():
            self._ticker.join(2)

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            self.draw()


__all__ = ["CycleLike", "ProgressBar", "State", "duration", "render", "terminal_width"]
