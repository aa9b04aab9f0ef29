"""``pkfuse bench``: the project's speed and memory numbers, measured in one run.

Each area module (``store``, ``mount``, ``iommu``, ...) has ``run(report, args)``
and adds results to the ``Report``. Where the issue gives a baseline (reading
the image directly, say) the baseline is measured in the same run and the
result is reported as a ratio, because machines are shared and noisy; a
target is checked against the measured value and marked ok/MISS.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

AREAS = ("store", "mount", "iommu", "control", "vmm", "crash", "fuzz", "restart")  #: modules of this package, in run order
#: what a run without ``--only`` measures: ``restart`` (whole live updates of a 16 GiB VM, minutes) only on request
DEFAULT_AREAS = tuple(a for a in AREAS if a != "restart")


@dataclasses.dataclass
class Result:
    area: str
    name: str
    value: float
    unit: str
    target: str = ""  #: human-readable target, e.g. "< 1 s" or ">= 0.25x"
    ok: bool | None = None  #: None when there is no target
    detail: str = ""


class Report:
    """Collects results; ``area`` is set by the runner before each module runs."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.area = ""

    def add(self, name: str, value: float, unit: str, *, below: float | None = None,
            at_least: float | None = None, detail: str = "") -> Result:
        """Record ``value``; ``below``/``at_least`` give the target it must meet."""
        ok: bool | None = None
        target = ""
        if below is not None:
            ok, target = value < below, f"< {below:g} {unit}"
        if at_least is not None:
            ok, target = value >= at_least, f">= {at_least:g} {unit}"
        r = Result(self.area, name, value, unit, target, ok, detail)
        self.results.append(r)
        print(format_result(r), flush=True)
        return r

    @property
    def misses(self) -> list[Result]:
        return [r for r in self.results if r.ok is False]


def format_result(r: Result) -> str:
    mark = {True: "ok", False: "MISS", None: ""}[r.ok]
    line = f"{r.area:7s} {r.name:52s} {r.value:12.4g} {r.unit:8s} {r.target:16s} {mark}"
    return line + (f"  ({r.detail})" if r.detail else "")


@contextmanager
def timer() -> Iterator[Callable[[], float]]:
    """``with timer() as elapsed: ...``; ``elapsed()`` gives seconds (frozen at exit)."""
    start = time.perf_counter()
    end: list[float] = []
    yield lambda: (end[0] if end else time.perf_counter()) - start
    end.append(time.perf_counter())


def best_of(n: int, fn: Callable[[], object]) -> float:
    """The fastest of ``n`` runs of ``fn`` in seconds: the least noisy estimate."""
    return best_interleaved([fn], rounds=n)[0]


def best_interleaved(fns: list[Callable[[], object]], *, rounds: int,
                     before: Callable[[], object] = lambda: None) -> list[float]:
    """The fastest seconds of each of ``fns`` over ``rounds`` rounds that run them in turn.

    Alternating, a slow spell of the shared machine hits every measure, not
    just the one that happened to run then. ``before`` runs untimed before each.
    """
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            before()
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a fast sanity run")
    parser.add_argument("--only", action="append", choices=AREAS, metavar="AREA",
                        help=f"run only this area (repeatable): {', '.join(AREAS)}; without it, every area "
                             "but restart")
    parser.add_argument("--dir", default=None, help="directory for scratch images (default: a temporary one)")
    parser.add_argument("--json", metavar="FILE", help="also write the results to FILE as JSON")
    parser.add_argument("--stress", type=int, default=0, metavar="N",
                        help="crash area: run N kill points instead of the default")
    # the restart area's (pkfuse.bench.restart, not imported here: every pkfuse command builds this parser)
    parser.add_argument("--restart-guest-size", default=None, metavar="SIZE",
                        help="restart area: guest RAM (default 16G; 256M with --quick)")
    parser.add_argument("--restart-cycles", type=int, default=None, metavar="N",
                        help="restart area: live updates per row (default 5; 1 with --quick)")
    parser.add_argument("--restart-dirty-share", type=float, default=None, metavar="F",
                        help="restart area: the share of RAM the guest keeps dirtying (default 0.5, or 1 GiB's "
                             "worth of a bigger guest)")


def run(args: argparse.Namespace) -> int:
    """Run the selected areas; exit status 1 if a target was missed."""
    report = Report()
    print(f"{'area':7s} {'measure':52s} {'value':>12s} {'unit':8s} {'target':16s}")
    for area in args.only or DEFAULT_AREAS:
        report.area = area
        module = importlib.import_module(f"{__name__}.{area}")
        module.run(report, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in report.results], f, indent=1)
    misses = report.misses
    print(f"{len(report.results)} results, {len(misses)} missed targets", file=sys.stderr)
    return 1 if misses else 0
