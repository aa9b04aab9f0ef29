"""``pkfuse fuzz``: hostile input at a trust boundary for a while, then the counts (issue 14).

``pkfuse fuzz --target requests --seconds S`` mounts a fresh image in a work
directory (``--workdir``, by default a temporary one, removed after), drives
its control socket with model-checked call sequences (``pkfuse.fuzz.requests``)
and prints one line of counts; ``--json FILE`` gets the whole report. Exit 0
only when there was no crash, no hang and no invariant violation.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

TARGETS = ("requests",)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz", help="fuzz a trust boundary of a real daemon against a model",
                       description="Fuzz a real daemon: every answer checked against a model, the invariants "
                                   "after every sequence. Exit 1 on a crash, a hang or a violation.")
    p.add_argument("--target", choices=TARGETS, required=True, help="requests: the control socket's calls")
    p.add_argument("--seconds", type=float, default=10.0, help="how long to fuzz (default 10)")
    p.add_argument("--seed", type=int, help="the random engine's seed (default: a random one, reported)")
    p.add_argument("--engine", choices=("random", "atheris"), default="random",
                   help="random (seeded) or atheris (libFuzzer's coverage-guided loop; needs atheris installed)")
    p.add_argument("--length", type=int, default=40, help="steps per sequence (default 40)")
    p.add_argument("--workdir", metavar="DIR", help="keep the image, the daemon's log and the socket here")
    p.add_argument("--json", metavar="FILE", help="the whole report, with every finding's steps ('-': stdout)")
    p.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    from pkfuse.fuzz import requests

    if args.seconds < 0:
        raise ValueError(f"--seconds {args.seconds}: not negative")
    if args.length < 1:
        raise ValueError(f"--length {args.length}: at least 1")
    workdir = Path(args.workdir).resolve() if args.workdir else None
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)

    def report(rep: dict) -> int:
        slow = rep["slowest_case"]
        print(f"fuzz requests ({rep['engine']}, seed {rep['seed']}): {rep['cases']} cases in {rep['sequences']} "
              f"sequences, {rep['accepted']} accepted, {rep['refused']} refused, {rep['crashes']} crashes, "
              f"{rep['hangs']} hangs, {rep['violations']} violations; slowest {slow['seconds'] * 1e3:.1f} ms "
              f"({slow['case']})")
        for f in rep["findings"][:5]:
            print(f"  {f['kind']}: {f['what']}")
        if args.json is not None:
            requests.write_json(rep, args.json)
        return 0 if rep["crashes"] == rep["hangs"] == rep["violations"] == 0 else 1

    if args.engine == "atheris":
        try:
            import atheris  # noqa: F401 - only whether it is there
        except ImportError:
            raise ValueError("--engine atheris: atheris is not installed (pip install atheris)") from None
    return report(requests.run(args.seconds, seed=args.seed, engine=args.engine, workdir=workdir,
                               length=args.length, on_report=report))
