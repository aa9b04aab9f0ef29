"""SIGKILL at random instants: every completed operation survives, the one in flight is whole.

``backing.crashtest.run_rounds`` forks a writer per round, kills it with a
real SIGKILL (after a random delay, or when it stops itself at a randomly
chosen journal protocol step), runs fsck on the image, reopens it and
compares it with a model; it raises ``CrashCheckFailed`` on any violation.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from backing.crashtest import CrashCheckFailed, Stats, run_rounds
from backing.journal import Journal, Transaction

ROUNDS = 300


def assert_not_vacuous(stats: Stats, rounds: int) -> None:
    """The run exercised both outcomes of the in-flight operation and a journal replay."""
    assert stats.rounds == rounds
    assert stats.in_flight_present > 0, stats
    assert stats.in_flight_absent > 0, stats
    assert stats.recoveries > 0, stats
    assert stats.ops_completed > rounds, stats


def test_300_kill_points_keep_completed_ops_and_the_in_flight_op_whole(tmp_path: Path) -> None:
    stats = run_rounds(str(tmp_path / "crash.img"), ROUNDS, seed=20261125)
    assert_not_vacuous(stats, ROUNDS)
    assert 0 < stats.step_kills < ROUNDS  # both timed and protocol-step kills ran
    assert stats.enospc > 0  # the image filled up, and refusals matched the model
    assert stats.kills_at["body"] > 0  # killed before the commit point: must be absent
    assert stats.kills_at["commit"] + stats.kills_at["apply"] > 0  # after it: must be replayed


def test_timed_kills_alone_keep_the_promise(tmp_path: Path) -> None:
    """Kills at arbitrary instants, also inside data stores and punch-holes."""
    stats = run_rounds(str(tmp_path / "crash.img"), 60, seed=7, step_fraction=0.0, max_delay=0.01)
    assert stats.step_kills == 0 and stats.rounds == 60
    assert stats.in_flight_present + stats.in_flight_absent > 0


def test_crash_recovery_works_on_dev_shm() -> None:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm on this machine")
    path = Path(f"/dev/shm/pkfuse-test-crash-{os.getpid()}.img")
    try:
        stats = run_rounds(str(path), 60, seed=3, step_fraction=0.8)
        assert_not_vacuous(stats, 60)
    finally:
        path.unlink(missing_ok=True)


def test_the_harness_catches_metadata_stores_without_a_journal(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: records stored in place with no commit point must be caught as torn."""

    def commit_in_place(self: Journal, txn: Transaction) -> None:
        hook = self.step_hook
        for i, (offset, payload) in enumerate(txn.records):
            self.image[offset : offset + len(payload)] = np.frombuffer(payload, np.uint8)
            if hook:
                hook(f"apply:{i}")

    monkeypatch.setattr(Journal, "commit", commit_in_place)  # the forked writers inherit it
    with pytest.raises(CrashCheckFailed):
        run_rounds(str(tmp_path / "crash.img"), 200, seed=11, step_fraction=1.0)
