"""The project frame: one set-up script, the README's two commands, CI calling the second."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import force_unmount

ROOT = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README has no sh block with the two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_gives_exactly_two_commands_demo_then_test() -> None:
    assert readme_commands() == ["scripts/run demo", "scripts/run test"]


def test_ci_runs_the_readme_test_command() -> None:
    lines = [ln.strip() for ln in (ROOT / ".ci/run").read_text().splitlines()]
    assert readme_commands()[1] in lines


def test_setup_is_idempotent_and_silent_when_set_up() -> None:
    venv = Path(sys.prefix)
    result = subprocess.run(["bash", str(ROOT / "scripts/setup.sh")], capture_output=True, text=True,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PKFUSE_VENV": str(venv)}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "installing" not in result.stderr, result.stderr


def test_both_commands_share_one_setup_script() -> None:
    code = [ln for ln in (ROOT / "scripts/run").read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert sum("scripts/setup.sh" in ln for ln in code) == 1
    assert not any("apt-get" in ln or "pip " in ln for ln in code)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).with_name("pkfuse")  # the venv's bin, where setup installs it
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "mkfs" in out.stdout


def using_it_commands() -> list[str]:
    """The command lines of the README's "Using it" block, comments dropped."""
    section = (ROOT / "README.md").read_text().partition("## Using it")[2]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "README's Using it has no sh block"
    return [line.partition("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


@pytest.mark.mount
def test_readme_using_it_runs_as_written(tmp_path: Path) -> None:
    """Each line of "Using it", in order, on a fresh machine's terms: the mountpoint does not exist yet.

    Only paths and sizes change (a 1 GiB image in tmp_path, /run/pkernfs under
    it); the bench line is left to the bench's own test.
    """
    mnt = tmp_path / "run" / "pkernfs"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    outputs: dict[str, str] = {}
    try:
        for line in using_it_commands():
            if line.startswith("pkfuse bench"):
                continue
            cmd = (line.replace("/run/pkernfs", str(mnt)).replace("--size 16G", "--size 1G")
                   .replace("truncate -s 2G", "truncate -s 64M"))
            r = subprocess.run(["bash", "-c", cmd], cwd=tmp_path, capture_output=True, text=True, env=env,
                               timeout=60)
            assert r.returncode == 0, f"{line}: {r.stderr}"
            outputs[line] = r.stdout
    finally:
        force_unmount(mnt)
    extents = next(out for line, out in outputs.items() if "--only-values -n user.pkernfs.extents" in line)
    rows = extents.splitlines()
    assert rows and all(re.fullmatch(r"0x[0-9a-f]+ 0x[0-9a-f]+ 0x[0-9a-f]+", row) for row in rows), extents


def test_readme_layout_table_names_every_module_and_test_folder() -> None:
    """"Layout of the repository" keeps up with the tree: a row per folder of modules, naming each module
    (``name.py``, or ``name`` in a list of them), and the tests row naming each test folder."""
    section = (ROOT / "README.md").read_text().partition("## Layout of the repository")[2].partition("\n## ")[0]
    rows = {m[1]: m[2] for m in re.finditer(r"^\| `([^`]+/)` \| (.*) \|$", section, re.M)}
    folders = ["backing/"] + [f"pkfuse/{p.name}/" for p in sorted((ROOT / "pkfuse").iterdir())
                              if (p / "__init__.py").exists()]
    for folder in folders:
        assert folder in rows, f"README's layout table has no row for {folder}"
        for mod in sorted((ROOT / folder).glob("*.py")):
            if mod.name not in ("__init__.py", "__main__.py"):
                assert f"`{mod.name}`" in rows[folder] or f"`{mod.stem}`" in rows[folder], \
                    f"README's row for {folder} does not name {mod.name}"
    for sub in sorted(p for p in (ROOT / "tests").iterdir() if p.is_dir() and any(p.glob("test_*.py"))):
        assert f"`{sub.name}/`" in rows["tests/"], f"README's tests row does not name {sub.name}/"
