#!/usr/bin/env bash
# Set up everything pkfuse needs on a Debian machine, idempotently:
# apt packages for FUSE, a virtual environment in .venv, the package with
# its test extra. A second run only checks stamps and returns in well under
# a second; it prints nothing when already set up. Run it, do not source it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PKFUSE_VENV:-$ROOT/.venv}"
# gcc and libc6-dev: pyfuse3 is compiled at install (PyPI has no wheel of it)
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config attr gcc libc6-dev)

# The interpreter: the daemon's start-up and its cost per FUSE request are
# interpreter-bound, and Debian's python3 (built with PGO and LTO) starts in
# ~15 ms where an unoptimized build takes ~35 ms, and imports ~20% faster
# (both measured by hand on the development machine).
# PKFUSE_PYTHON overrides; python3 on PATH is the fallback.
PYTHON="${PKFUSE_PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -x /usr/bin/python3 ]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi
interp="$(command -v "$PYTHON" || true)"
if [ -z "$interp" ]; then
    echo "setup: error: no Python interpreter '$PYTHON' (set PKFUSE_PYTHON to one, 3.11 or newer)" >&2
    exit 1
fi
interp="$(readlink -f "$interp")"
# Debian's python3 ships venv's ensurepip and the C headers (pyfuse3 compiles
# against them) in separate packages
case "$interp" in
    /usr/bin/python3*)
        "$interp" -c "import ensurepip" 2>/dev/null || APT_PACKAGES+=(python3-venv)
        "$interp" -c "import os, sysconfig; assert os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h'))" \
            2>/dev/null || APT_PACKAGES+=(python3-dev)
        ;;
esac

need_apt=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
    echo "setup: installing apt packages: ${need_apt[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >&2
fi

# the stamp names the inputs of the install: a changed pyproject or another
# interpreter reinstalls
stamp="$VENV/.pkfuse-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1) $interp"
# the interpreter a venv was made from, as pyvenv.cfg records it
venv_interp="$(sed -n 's/^executable *= *//p' "$VENV/pyvenv.cfg" 2>/dev/null || true)"
if [ -x "$VENV/bin/python" ] && [ "$(readlink -f "${venv_interp:-/nonexistent}" || true)" != "$interp" ]; then
    echo "setup: recreating $VENV for $interp" >&2
    "$interp" -m venv --clear "$VENV" >&2
elif [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV with $interp" >&2
    "$interp" -m venv "$VENV" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pkfuse and its test extra into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >&2
    echo "$want" > "$stamp"
fi
# Bytecode for pkfuse's own modules: an editable install compiles none, and
# where PYTHONDONTWRITEBYTECODE is set every daemon start would compile
# ~8,000 lines again (~60 ms of a mount). compileall skips current .pyc files.
"$VENV/bin/python" -m compileall -q "$ROOT/backing" "$ROOT/pkfuse" >&2
