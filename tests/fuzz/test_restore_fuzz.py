"""``pkfuse fuzz --target sessions|images``: the corpus replayed, a short fuzz, and a judge that can fail.

A case edits a frozen image of two sessions (``pkfuse.fuzz.preserved``),
starts the next kernel in this process and judges it against the hardware's
view, the frozen record and fsck. The judge's own tests break an invariant
by hand after a clean restore -- a requester let into the other VM, a right
changed, a restored session's device blocked, a page leaked -- and require
it to say so: a fuzzer whose judge cannot fail finds nothing by design.
"""

from __future__ import annotations

import json
import runpy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from backing import format as fmt
from pkfuse.fuzz import cases, images, preserved, sessions
from pkfuse.harness.tables import device_reach

CORPUS = Path(__file__).with_name("corpus")
MiB = 1 << 20


def _clean(report: dict) -> None:
    assert report["crashes"] == report["hangs"] == report["violations"] == 0, json.dumps(report["findings"],
                                                                                         indent=1)[:4000]


@pytest.mark.parametrize("target", ["sessions", "images"])
def test_the_corpus_is_what_the_script_makes(target: str) -> None:
    namespace = runpy.run_path(str(Path(__file__).with_name("make_corpus.py")), run_name="corpus")
    kept = {"sessions": "SESSION_CASES", "images": "IMAGE_CASES"}[target]
    assert json.loads((CORPUS / f"{target}.json").read_text()) == json.loads(json.dumps(namespace[kept]))


@pytest.mark.parametrize("target", ["sessions", "images"])
def test_the_corpus_replays_with_the_outcome_it_keeps(tmp_path: Path, target: str) -> None:
    kept = json.loads((CORPUS / f"{target}.json").read_text())
    report, outcomes = cases.replay(target, list(kept.values()), workdir=tmp_path)
    _clean(report)
    assert {n: o for n, o in zip(kept, outcomes)} == {n: c["expect"] for n, c in kept.items()}


@pytest.mark.parametrize("target", ["sessions", "images"])
def test_a_short_fuzz_of_a_1_gib_image_finds_nothing(tmp_path: Path, target: str) -> None:
    generate = {"sessions": sessions.generate, "images": images.generate}[target]
    report = cases.run(target, generate, 3.0, seed=14, workdir=tmp_path)
    _clean(report)
    assert report["image_bytes"] == 1 << 30 and report["cases"] >= 5 and report["refused"] > 0
    assert set(report["cases_by_design"]) <= set(preserved.DESIGNS)


@pytest.mark.parametrize("alarm", [1e-4, 0.004, 0.008, 0.015])  # in the copy, the open, the restore, the judge
def test_a_hang_is_counted_and_the_next_case_starts_clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           alarm: float) -> None:
    runner = cases.Runner(tmp_path, 64 * MiB)
    for design in preserved.DESIGNS:
        monkeypatch.setattr(cases, "HANG_SECONDS", alarm)
        assert runner.run_case(design, []) in ("hang", "accepted")  # a case quicker than the alarm is not cut
        monkeypatch.setattr(cases, "HANG_SECONDS", 10.0)
        assert runner.run_case(design, []) == "accepted"  # nothing the cut case held is in its way
    assert runner.stats.crashes == runner.stats.violations == 0 and runner.stats.hangs >= (alarm < 1e-3) * 2


def test_the_cli_reports_counts_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "pkfuse", "fuzz", "--target", "images", "--seconds", "1", "--seed", "3",
                        "--image-size", "64M", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("fuzz images (random, seed 3): ") and " 0 crashes, 0 hangs, 0 violations" in r.stdout
    d = json.loads(out.read_text())
    assert d["target"] == "images" and d["cases"] >= 1 and d["image_bytes"] == 64 * MiB


def test_the_atheris_engine_fuzzes_for_its_seconds_past_instrumentation(tmp_path: Path) -> None:
    pytest.importorskip("atheris")  # optional: not in the project's environment
    out = tmp_path / "r.json"
    r = subprocess.run([sys.executable, "-m", "pkfuse", "fuzz", "--target", "sessions", "--engine", "atheris",
                        "--seconds", "2", "--seed", "5", "--image-size", "64M", "--workdir", str(tmp_path / "w"),
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["engine"] == "atheris" and d["cases"] >= 1 and d["crashes"] == d["violations"] == 0


# ------------------------------------------------------------------ the judge


@pytest.fixture(params=preserved.DESIGNS)
def restored(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[preserved.Frozen, Path,
                                                                              preserved.Kernel]]:
    """A clean restore of a frozen image (no edit), the kernel still up; closed at teardown if the test
    did not hand it to the judge."""
    frozen = preserved.freeze(tmp_path, request.param, 64 * MiB)
    image = tmp_path / "case.img"
    frozen.copy_to(image)
    kernel = preserved.Kernel(image, request.param)
    assert sorted(kernel.lu.incoming) == sorted(preserved.VMS)
    yield frozen, image, kernel
    kernel.close()  # a no-op once the judge closed it


def test_the_judge_passes_a_clean_restore(restored) -> None:
    frozen, image, kernel = restored
    assert preserved.judge(frozen, image, kernel).refused == []


def test_the_judge_faults_a_requester_let_into_another_vm(restored) -> None:
    frozen, image, kernel = restored
    u64 = kernel.store.image_u64
    src = frozen.sessions[b"vm1"].context
    dst = int(frozen.root_pages[1]) * 512 + 0x28 * 2  # 00:05.0: no session's
    u64[dst : dst + 2] = u64[src : src + 2]
    with pytest.raises(preserved.Violation, match="00:05.0 reaches .* no restored session"):
        preserved.judge(frozen, image, kernel)


def test_the_judge_faults_a_right_taken_away(restored) -> None:
    frozen, image, kernel = restored
    did = kernel.io.attached[frozen.sessions[b"vm0"].rid]
    dom = kernel.io.domains[did]
    leaf = dom.leaf_at(preserved.IOVA)
    assert leaf is not None
    dom.memory.u64[leaf[1]] &= ~np.uint64(fmt.SL_W)
    with pytest.raises(preserved.Violation, match="reaches other pages than before"):
        preserved.judge(frozen, image, kernel)


def test_the_judge_faults_a_restored_session_whose_device_is_blocked(restored) -> None:
    frozen, image, kernel = restored
    rid = frozen.sessions[b"vm1"].rid
    kernel.io.detach(kernel.io.domains[kernel.io.attached[rid]], rid >> 8, (rid >> 3) & 0x1F, rid & 7)
    with pytest.raises(preserved.Violation, match="vm1'.* is blocked: not whole"):
        preserved.judge(frozen, image, kernel)


def test_the_judge_faults_an_image_fsck_finds_unclean(restored) -> None:
    frozen, image, kernel = restored
    g = kernel.store.geometry
    kernel.store.image[g.bitmap_page * fmt.PAGE_SIZE + frozen.free_page // 8] |= np.uint8(1 << frozen.free_page % 8)
    with pytest.raises(preserved.Violation, match="fsck after the restore"):
        preserved.judge(frozen, image, kernel)


# ------------------------------------------------------------------ the hardware's reach


def test_device_reach_of_a_frozen_image_is_each_vms_files_and_nothing_else(tmp_path: Path) -> None:
    frozen = preserved.freeze(tmp_path, "persistent", 64 * MiB)
    reach = device_reach(frozen.image)
    assert sorted(reach) == sorted(s.rid for s in frozen.sessions.values())
    vm1 = reach[frozen.sessions[b"vm1"].rid]
    assert vm1.pages() == (4 * MiB + 2 * MiB) // fmt.PAGE_SIZE
    assert sorted(set(vm1.rights.tolist())) == [1, 3]  # its read-only file and its read-write one


def test_device_reach_of_a_table_pointing_at_itself_ends(tmp_path: Path) -> None:
    frozen = preserved.freeze(tmp_path, "persistent", 64 * MiB)
    fs = frozen.sessions[b"vm0"]
    preserved.apply(frozen, frozen.image, {"kind": "entry", "session": "vm0", "level": 1, "slot": 7,
                                           "value": ["table", "own-table"]})  # a PDPE back at its own PDPT
    reach = device_reach(frozen.image)[fs.rid]  # the hardware reads it as a PD whose entries are PDPEs
    assert reach.pages() >= 1024
