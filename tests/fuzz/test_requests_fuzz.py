"""``pkfuse fuzz --target requests``: the corpus replayed, and a short fuzz, against real daemons.

Every sequence runs through the fuzzer's model (``pkfuse.fuzz.requests``): each
errno as the model says, and after each sequence the daemon's objects,
connections and mappings as the model's, the hardware's translations as the
model allows, pins, free pages and fsck. The daemons are the fuzzer's own
(``--foreground``, known by pid), stopped when it returns, also on failure.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from pkfuse.fuzz import requests

pytestmark = pytest.mark.mount

CORPUS = Path(__file__).with_name("corpus") / "requests.json"


def _clean(report: dict) -> None:
    assert report["crashes"] == report["hangs"] == report["violations"] == 0, json.dumps(report["findings"],
                                                                                         indent=1)[:4000]


def test_the_corpus_is_what_the_script_makes() -> None:
    namespace = runpy.run_path(str(Path(__file__).with_name("make_corpus.py")), run_name="corpus")
    assert json.loads(CORPUS.read_text()) == json.loads(json.dumps(namespace["SEQUENCES"]))


def test_the_corpus_replays_clean(tmp_path: Path) -> None:
    corpus = json.loads(CORPUS.read_text())
    report = requests.replay(list(corpus.values()), tmp_path)
    _clean(report)
    assert report["sequences"] == len(corpus)
    assert report["skipped_steps"] == 0  # every step reached the connection it names
    for name in ("EBADF", "EINVAL", "EOVERFLOW", "EEXIST", "ENOENT", "EBUSY", "ESHUTDOWN", "EMSGSIZE", "E2BIG",
                 "ENOTTY", "EACCES", "ENODATA"):
        assert report["refused_by_errno"].get(name), (name, report["refused_by_errno"])


def test_a_short_fuzz_finds_nothing(tmp_path: Path) -> None:
    """The command as a user runs it: a few seconds, a JSON report, exit 0."""
    out = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pkfuse", "fuzz", "--target", "requests", "--seconds", "4",
                        "--seed", "14", "--workdir", str(tmp_path / "work"), "--json", str(out)],
                       capture_output=True, text=True, timeout=180)
    report = json.loads(out.read_text())
    _clean(report)
    assert r.returncode == 0, r.stdout + r.stderr
    assert report["cases"] > 50 and report["accepted"] and report["refused"]
    assert report["cases"] == report["accepted"] + report["refused"]
    assert report["slowest_case"]["seconds"] < requests.CALL_TIMEOUT
    assert "0 crashes, 0 hangs, 0 violations" in r.stdout


def test_the_model_is_not_vacuous(tmp_path: Path) -> None:
    """A step whose answer the model gets wrong is a violation, and the fuzzer goes on with a fresh daemon."""
    seq = [{"op": "open", "c": -1, "path": "iommu"}, {"op": "ioas_alloc", "c": 0},
           {"op": "map_file", "c": 0, "ioas": 1, "fd": "a", "flags": 7, "start": 0, "length": 4096, "iova": 0}]
    fz = requests.RequestFuzzer(tmp_path)
    fz.start()
    try:
        fz.size["a"] = 0  # the model now believes a is empty: the map's success contradicts it
        found = fz.run_sequence(seq)
        assert isinstance(found, requests.Violation) and "the model says EINVAL" in str(found)
        fz.size["a"] = requests.GUEST["a"]
        assert fz.run_sequence(seq[:3]) is None  # a fresh daemon, clean
        assert fz.stats.restarts == 1
    finally:
        fz.close()
