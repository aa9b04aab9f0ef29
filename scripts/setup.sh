#!/usr/bin/env bash
# Set up everything pkfuse needs on a Debian machine, idempotently:
# apt packages for FUSE, a virtual environment in .venv, the package with
# its test extra. A second run only checks stamps and returns in well under
# a second. Source it or run it; it prints nothing when already set up.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PKFUSE_VENV:-$ROOT/.venv}"
APT_PACKAGES=(fuse3 libfuse3-dev pkg-config attr)

# Debian's own python3 ships venv's ensurepip in a separate package
python3 -c "import ensurepip" 2>/dev/null || APT_PACKAGES+=(python3-venv)

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

# the stamp names the inputs of the install: a changed pyproject reinstalls
stamp="$VENV/.pkfuse-installed"
want="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating virtual environment $VENV" >&2
    python3 -m venv "$VENV" >&2
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing pkfuse and its test extra into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" >&2
    echo "$want" > "$stamp"
fi
