"""The restore fuzzers' loop: a case is a list of edits to a frozen image, run on the next kernel and judged.

``sessions`` and ``images`` differ only in the edits they draw (structured
garbage aimed at records and entries; raw bytes in the session area, the
fixed domains and the metadata); this module runs them: both designs frozen
once (``preserved.freeze``), then per case a copy, the edits, the next
kernel's start (the time a case is measured by: the open and the restore,
what a real restart pays) and ``preserved.judge``. A case that raises
anything but an image refused as a whole (``FormatError``) is a crash; one
that runs past ``HANG_SECONDS`` (SIGALRM) a hang; one the judge faults a
violation. Each finding keeps its design and edits, so it replays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from backing.errors import FormatError

from . import preserved
from .common import AtherisEntropy, Entropy, exit_past

HANG_SECONDS = 10.0  #: a case's start and judgement past this is a hang
Generate = Callable[[Entropy, preserved.Frozen], list[dict[str, Any]]]


class Hang(Exception):
    pass


@dataclasses.dataclass
class Stats:
    cases: int = 0
    accepted: int = 0  #: cases the next kernel adopted whole (the edit changed nothing it relies on)
    refused: Counter[str] = dataclasses.field(default_factory=Counter)  #: by the structure a refusal names
    refused_cases: int = 0
    crashes: int = 0
    hangs: int = 0
    violations: int = 0
    slowest: tuple[float, str] = (0.0, "")  #: the next kernel's open + restore
    slowest_total: float = 0.0  #: a whole case: copy, edits, start, judgement
    findings: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    by_design: Counter[str] = dataclasses.field(default_factory=Counter)

    def report(self, **extra: Any) -> dict[str, Any]:
        return {"cases": self.cases, "accepted": self.accepted, "refused": self.refused_cases,
                "refused_by_finding": dict(self.refused.most_common()), "crashes": self.crashes,
                "hangs": self.hangs, "violations": self.violations, "cases_by_design": dict(self.by_design),
                "slowest_case": {"seconds": round(self.slowest[0], 6), "case": self.slowest[1]},
                "slowest_case_with_judgement_seconds": round(self.slowest_total, 6),
                "findings": self.findings[:20], **extra}


class Runner:
    """Frozen images of both designs in ``workdir``, and the cases run on copies of them."""

    def __init__(self, workdir: Path, size: int = preserved.IMAGE_SIZE) -> None:
        self.workdir = workdir
        t0 = time.monotonic()
        self.frozen = {d: preserved.freeze(workdir, d, size) for d in preserved.DESIGNS}
        self.freeze_seconds = time.monotonic() - t0
        self.stats = Stats()
        self.image = workdir / "case.img"

    def run_case(self, design: str, edits: list[dict[str, Any]]) -> str:
        """One case; what became of it: ``accepted``, ``refused``, ``crash``, ``hang`` or ``violation``."""
        st = self.stats
        st.cases += 1
        st.by_design[design] += 1
        frozen = self.frozen[design]
        t0 = time.monotonic()
        boot = 0.0
        try:
            with _deadline(HANG_SECONDS):
                frozen.copy_to(self.image)
                for edit in edits:
                    preserved.apply(frozen, self.image, edit)
                t1 = time.monotonic()
                try:
                    kernel = preserved.Kernel(self.image, design)
                except FormatError as exc:
                    boot = time.monotonic() - t1
                    preserved.check_named(exc, self.image)
                    refused = [preserved.refusal_of(exc)]
                else:
                    boot = time.monotonic() - t1
                    refused = preserved.judge(frozen, self.image, kernel).refused
        except preserved.Violation as exc:
            return self._finding("violation", str(exc), design, edits)
        except Hang:
            return self._finding("hang", f"no answer within {HANG_SECONDS:g} s", design, edits)
        except Exception as exc:  # noqa: BLE001 -- a crash of the next kernel is what is counted
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return self._finding("crash", f"{type(exc).__name__}: {exc} ({where.filename}:{where.lineno})",
                                 design, edits)
        total = time.monotonic() - t0
        if boot > st.slowest[0]:
            st.slowest = (boot, f"{design}: {describe(edits)}")
        st.slowest_total = max(st.slowest_total, total)
        if refused:
            st.refused_cases += 1
            st.refused.update(refused)
            return "refused"
        st.accepted += 1
        return "accepted"

    def _finding(self, kind: str, what: str, design: str, edits: list[dict[str, Any]]) -> str:
        st = self.stats
        if kind == "violation":
            st.violations += 1
        elif kind == "crash":
            st.crashes += 1
        else:
            st.hangs += 1
        st.findings.append({"kind": kind, "what": what, "design": design, "edits": edits})
        return kind


def describe(edits: list[dict[str, Any]]) -> str:
    """A case in one line (its edits, compactly)."""
    out = []
    for e in edits:
        rest = ",".join(f"{k}={v}" for k, v in e.items() if k != "kind")
        out.append(f"{e['kind']}({rest})")
    return "; ".join(out) or "no edit"


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The next kernel's warnings (one per refusal, thousands of cases) stay out of the output."""
    lg = logging.getLogger("backing")
    old = lg.level
    lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        lg.setLevel(old)


@contextlib.contextmanager
def _workdir(workdir: Path | None) -> Iterator[Path]:
    own = workdir is None
    wd = Path(tempfile.mkdtemp(prefix="pkfuse-fuzz-")) if own else workdir
    try:
        yield wd
    finally:
        if own:
            shutil.rmtree(wd, ignore_errors=True)


def run(target: str, generate: Generate, seconds: float, *, seed: int, workdir: Path | None = None,
        size: int = preserved.IMAGE_SIZE, engine: str = "random",
        on_report: Callable[[dict[str, Any]], int] | None = None) -> dict[str, Any]:
    """Draw and run cases for ``seconds`` (at least one); the report (``Stats.report``).

    With ``engine="atheris"`` libFuzzer's loop draws the cases, its coverage the next kernel's own code
    (the restore runs in this process), and never returns: when the time is up ``on_report`` gets the
    report and the process exits with what it returns.
    """
    with _workdir(workdir) as wd, quiet():
        runner = Runner(wd, size)
        clock = [time.monotonic()]  #: when fuzzing began (for atheris: its first input, past instrumentation)

        def report() -> dict[str, Any]:
            return runner.stats.report(target=target, engine=engine, seed=seed,
                                       seconds=round(time.monotonic() - clock[0], 3),
                                       freeze_seconds=round(runner.freeze_seconds, 3), image_bytes=size)

        if engine == "atheris":
            _run_atheris(runner, generate, seconds, clock, seed, wd, lambda: (on_report or (lambda r: 0))(report()))
        e = Entropy(seed)
        while True:
            design = e.choice(preserved.DESIGNS)
            runner.run_case(design, generate(e, runner.frozen[design]))
            if time.monotonic() - clock[0] >= seconds:
                break
        return report()


def _run_atheris(runner: Runner, generate: Generate, seconds: float, clock: list[float], seed: int, workdir: Path,
                 done: Callable[[], int]) -> None:
    """libFuzzer's loop (atheris), one case per input, for ``seconds`` from its first input (``clock[0]``);
    then ``done()`` and exit with its status (libFuzzer's loop has no other way out)."""
    import atheris

    started = False

    def one(data: bytes) -> None:
        nonlocal started
        if not started:
            started, clock[0] = True, time.monotonic()
        exit_past(clock[0] + seconds, done)
        e = AtherisEntropy(atheris.FuzzedDataProvider(data), data)
        design = e.choice(preserved.DESIGNS)
        runner.run_case(design, generate(e, runner.frozen[design]))

    atheris.instrument_all()  # the next kernel's code among it: Store, Iommu, LiveUpdate run in this process
    atheris.Setup([sys.argv[0], f"-seed={seed % (1 << 31) or 1}", "-max_len=512", "-len_control=0",
                   f"-artifact_prefix={workdir}/"], one)
    atheris.Fuzz()


def replay(target: str, cases: list[dict[str, Any]], *, workdir: Path | None = None,
           size: int = preserved.IMAGE_SIZE) -> tuple[dict[str, Any], list[str]]:
    """Run kept cases (``{"design", "edits"}``); the report and each case's outcome, in order."""
    with _workdir(workdir) as wd, quiet():
        runner = Runner(wd, size)
        t0 = time.monotonic()
        outcomes = [runner.run_case(c["design"], c["edits"]) for c in cases]
        return runner.stats.report(target=target, engine="replay", seconds=round(time.monotonic() - t0, 3),
                                   image_bytes=size), outcomes
