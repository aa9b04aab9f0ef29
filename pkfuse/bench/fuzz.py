"""``pkfuse bench`` area ``fuzz``: how long the next kernel takes over tampered state (issue 14).

Target: every tampered case's restart -- the open and the restore a daemon
does at mount, on a 1 GiB image of two preserved sessions -- under 1 s.
The baseline, measured in the same run on the same frozen images, is the
untampered restart (best of five per design); the slowest tampered one is
reported against it as a ratio. The cases are those ``pkfuse fuzz --target
sessions`` and ``--target images`` draw (10 s of each; 2 s with
``--quick``); their crashes, hangs and violations must be 0.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from pkfuse.fuzz import cases, images, preserved, sessions
from pkfuse.fuzz.common import Entropy

from . import Report

SECONDS, QUICK_SECONDS = 10.0, 2.0


def _clean_restart(runner: cases.Runner, design: str) -> float:
    frozen = runner.frozen[design]
    frozen.copy_to(runner.image)
    t = time.perf_counter()
    kernel = preserved.Kernel(runner.image, design)
    took = time.perf_counter() - t
    kernel.close()
    return took


def run(report: Report, args: argparse.Namespace) -> None:
    seconds = QUICK_SECONDS if getattr(args, "quick", False) else SECONDS
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="pkfuse-fuzz-", dir=getattr(args, "dir", None)) as tmp, cases.quiet():
        runner = cases.Runner(Path(tmp))
        base = {d: min(_clean_restart(runner, d) for _ in range(5)) for d in preserved.DESIGNS}
        for d, s in base.items():
            report.add(f"untampered restart, {d} (baseline)", s * 1e3, "ms")
        for target, generate in (("sessions", sessions.generate), ("images", images.generate)):
            e = Entropy(seed)
            runner.stats.slowest = (0.0, "")
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                design = e.choice(preserved.DESIGNS)
                runner.run_case(design, generate(e, runner.frozen[design]))
            worst, case = runner.stats.slowest
            report.add(f"slowest tampered restart, {target}", worst * 1e3, "ms", below=1000,
                       detail=f"{worst / max(base.values()):.1f}x the baseline; {case[:90]}")
        st = runner.stats
        report.add("tampered cases", st.cases, "cases", detail=f"seed {seed}: {st.accepted} adopted whole, "
                   f"{st.refused_cases} refused")
        report.add("crashes, hangs and violations", st.crashes + st.hangs + st.violations, "count", below=1,
                   detail="; ".join(f["what"][:80] for f in st.findings[:2]))
