"""Building the guest binary (pkfuse/vmm/guest.py): flat, _start first, rebuilt only when a source changed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pkfuse.vmm import abi, guest


@pytest.fixture
def sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The guest's sources copied into tmp_path, built there (the repository's build is left alone)."""
    src = tmp_path / "guest"
    shutil.copytree(guest.SOURCE_DIR, src)
    monkeypatch.setattr(guest, "SOURCE_DIR", src)
    monkeypatch.setattr(guest, "BUILD_DIR", tmp_path / "build")
    return src


def test_the_binary_is_flat_code_at_the_text_gpa_entered_at_its_first_byte() -> None:
    text = guest.load()
    assert 0 < len(text) <= abi.GUEST_TEXT_MAX
    assert text[0] == 0xE8  # _start: call guest_main
    assert guest.binary_path().read_bytes() == text


def test_a_current_binary_is_not_rebuilt(sandbox: Path) -> None:
    path = guest.build()
    before = path.stat().st_mtime_ns
    assert guest.is_current()
    assert guest.ensure() == path and path.stat().st_mtime_ns == before


def test_a_changed_source_makes_it_stale_and_load_rebuilds_it(sandbox: Path) -> None:
    old = guest.build().read_bytes()
    c = sandbox / "guest.c"
    c.write_text(c.read_text().replace("void guest_main(uint64_t vcpu, const volatile struct config *cfg)\n{",
                                       "void guest_main(uint64_t vcpu, const volatile struct config *cfg)\n{\n"
                                       "    __asm__ volatile(\"nop\");"))
    assert not guest.is_current()
    assert guest.load() != old and guest.is_current()


def test_a_compile_error_is_one_line_naming_the_tool(sandbox: Path) -> None:
    (sandbox / "guest.c").write_text("int x = ;\n")
    with pytest.raises(guest.GuestBuildError, match=r"^building the guest: gcc failed") as e:
        guest.build()
    assert "\n" not in str(e.value)


def test_a_missing_gcc_is_one_clear_line(sandbox: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(guest.GuestBuildError, match="needs gcc, which is not installed"):
        guest.build()


def test_the_setup_step_prints_nothing_when_the_binary_is_current() -> None:
    guest.ensure()
    r = subprocess.run([sys.executable, "-m", "pkfuse.vmm.guest"], capture_output=True, text=True, check=False)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
