"""``pkfuse bench`` area ``crash``: the SIGKILL stress mode of issue 3.

Runs ``backing.crashtest.run_rounds``: ``args.stress`` kill points (default
2000, 300 with ``--quick``), each a real SIGKILL of a forked writer --
after a random delay, or at a randomly chosen journal protocol step -- then
fsck, reopen and comparison with a model. Reports the rate of kill points,
the operations completed, how often the in-flight operation was found
wholly present / wholly absent, how many opens replayed a committed
transaction, and where the step kills landed. A violation is reported as a
missed target (``violations`` must be below 1) with the harness's message,
not as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile

from backing.crashtest import STEP_KINDS, CrashCheckFailed, run_rounds

from . import Report

DEFAULT_ROUNDS = 2000
QUICK_ROUNDS = 300


def run(report: Report, args: argparse.Namespace) -> None:
    rounds = getattr(args, "stress", 0) or (QUICK_ROUNDS if getattr(args, "quick", False) else DEFAULT_ROUNDS)
    seed = int.from_bytes(os.urandom(4), "little")
    with tempfile.TemporaryDirectory(prefix="pkfuse-crash-", dir=getattr(args, "dir", None)) as tmp:
        image = os.path.join(tmp, "crash.img")
        # every round is a deliberate restart: the store's "recovered" warnings are noise here
        store_log = logging.getLogger("backing.store")
        level = store_log.level
        store_log.setLevel(logging.ERROR)
        try:
            stats = run_rounds(image, rounds, seed=seed)
        except CrashCheckFailed as exc:
            report.add("violations", 1, "count", below=1, detail=f"seed {seed}: {exc}")
            return
        finally:
            store_log.setLevel(level)
    report.add("kill points", stats.rounds, "rounds", at_least=rounds, detail=f"seed {seed}")
    report.add("kill points per second", stats.rounds / stats.seconds if stats.seconds else 0.0, "1/s")
    report.add("operations completed before the kills", stats.ops_completed, "ops")
    report.add("in-flight operation wholly present", stats.in_flight_present, "rounds", at_least=1)
    report.add("in-flight operation wholly absent", stats.in_flight_absent, "rounds", at_least=1)
    report.add("opens that replayed a committed transaction", stats.recoveries, "rounds", at_least=1)
    report.add("operations refused with ENOSPC, as predicted", stats.enospc, "ops")
    where = ", ".join(f"{k} {stats.kills_at[k]}" for k in STEP_KINDS)
    report.add("kills at a chosen journal step", stats.step_kills, "rounds", detail=where)
    report.add("violations", 0, "count", below=1)
