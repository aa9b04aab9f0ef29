"""What every ``pkfuse fuzz`` target shares: the source of its random choices and its JSON report."""

from __future__ import annotations

import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


class Entropy:
    """The random choices a generator makes; ``random.Random`` by default."""

    def __init__(self, seed: int | None = None) -> None:
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def choice(self, seq: Sequence[Any]) -> Any:
        return seq[self.int(0, len(seq) - 1)]

    def chance(self, p: float) -> bool:
        return self.int(0, 999) < int(p * 1000)

    def weighted(self, table: Sequence[tuple[Any, int]]) -> Any:
        total = sum(w for _, w in table)
        x = self.int(0, total - 1)
        for item, w in table:
            if x < w:
                return item
            x -= w
        return table[-1][0]


class AtherisEntropy(Entropy):
    """Choices read from atheris's FuzzedDataProvider (the input libFuzzer mutates, coverage-guided);
    once the input is used up, from ``random`` seeded with it, so that a short input still makes a
    whole sequence and the same input the same one."""

    def __init__(self, fdp: Any, data: bytes) -> None:
        self.fdp = fdp
        self.rng = random.Random(data)

    def int(self, lo: int, hi: int) -> int:
        if hi <= lo:
            return lo
        if self.fdp.remaining_bytes():
            return int(self.fdp.ConsumeIntInRange(lo, hi))
        return self.rng.randint(lo, hi)


def exit_past(deadline: float, done: Callable[[], int]) -> None:
    """Inside libFuzzer's loop (atheris), which has no other way out: once past ``deadline`` (monotonic),
    ``done()`` -- the report -- and exit with its status, stdio flushed."""
    if time.monotonic() > deadline:
        sys.stdout.flush()
        status = done()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def write_json(report: dict[str, Any], path: str) -> None:
    text = json.dumps(report, indent=2, default=str) + "\n"
    if path == "-":
        sys.stdout.write(text)
    else:
        Path(path).write_text(text)
