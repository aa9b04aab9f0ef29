#!/usr/bin/env bash
# Set up everything pkfuse needs on a Debian machine, idempotently:
# apt packages for FUSE, a virtual environment in .venv, the package with
# its test and plot extras (plot: matplotlib, for restart-test --plot). A
# second run only checks stamps and returns in well under a second; it
# prints nothing when already set up. Run it, do not source it.
#
# Exit status 0 when set up, 1 on any failure (one "setup: error:" line for
# the failures it foresees). PKFUSE_VENV and PKFUSE_PYTHON choose the
# environment (below). PKFUSE_APT_LOCK_TIMEOUT (seconds, default 300) bounds
# the wait for another package manager's apt/dpkg locks; PKFUSE_APT_LOCKS
# (colon-separated paths) replaces the list of locks, for the tests only.
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
# On a fresh cloud machine cloud-init or unattended-upgrades run apt for the
# first minutes, and apt-get fails at once on the locks they hold. apt's own
# DPkg::Lock::Timeout makes `apt-get install` wait for the two dpkg locks,
# but `apt-get update` ignores it for /var/lib/apt/lists/lock, and install
# does not wait for /var/cache/apt/archives/lock (both checked with apt 2.6).
# So we wait for all four ourselves, bounded, saying who holds what.
IFS=: read -r -a APT_LOCKS <<< "${PKFUSE_APT_LOCKS:-/var/lib/dpkg/lock-frontend:/var/lib/dpkg/lock:/var/lib/apt/lists/lock:/var/cache/apt/archives/lock}"
APT_LOCK_TIMEOUT="${PKFUSE_APT_LOCK_TIMEOUT:-300}"

# lock_holder FILE: the pid of a process holding a lock on FILE ("?" if it is
# in another pid namespace), nothing if it is free. apt and dpkg take fcntl
# locks; /proc/locks lists them to every user, by inode number (the device
# it gives differs from stat's on btrfs and overlayfs), so a holder whose
# descriptors we may read must have FILE itself open.
lock_holder() {
    local file="$1" ino pid fd
    ino="$(stat -L -c %i "$file" 2>/dev/null)" || return 0
    for pid in $(awk -v ino="$ino" '$2 != "->" { n = split($6, id, ":"); if (id[n] == ino) print $5 }' /proc/locks); do
        if [ "$pid" -le 0 ]; then echo "?"; return 0; fi
        if [ ! -r "/proc/$pid/fd" ]; then echo "$pid"; return 0; fi
        for fd in "/proc/$pid/fd/"*; do
            if [ "$fd" -ef "$file" ]; then echo "$pid"; return 0; fi
        done
    done
}

describe_pid() {
    if [ "$1" = "?" ]; then echo "a process in another pid namespace"
    else echo "pid $1 ($(cat "/proc/$1/comm" 2>/dev/null || echo "gone"))"; fi
}

# wait_for_apt_locks: return once no lock is held; past APT_DEADLINE, fail in one line
wait_for_apt_locks() {
    local lock pid said=""
    while :; do
        pid=""
        for lock in "${APT_LOCKS[@]}"; do
            pid="$(lock_holder "$lock")"
            [ -z "$pid" ] || break
        done
        [ -n "$pid" ] || return 0
        if [ "$SECONDS" -ge "$APT_DEADLINE" ]; then
            echo "setup: error: $lock is still held by $(describe_pid "$pid") after ${APT_LOCK_TIMEOUT}s: let that package manager finish (or stop it), then run setup again" >&2
            exit 1
        fi
        if [ "$said" != "$lock $pid" ]; then
            echo "setup: waiting for $lock, held by $(describe_pid "$pid") (another package manager is running; up to ${APT_LOCK_TIMEOUT}s)" >&2
            said="$lock $pid"
        fi
        sleep 0.5
    done
}

# apt_get ARGS: apt-get once the locks are free. A lock taken between our look
# and apt's makes apt-get fail ("Could not get lock"): then wait and retry.
apt_get() {
    local rc errors
    errors="$(mktemp)"
    while :; do
        wait_for_apt_locks
        rc=0
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o "DPkg::Lock::Timeout=$((APT_DEADLINE > SECONDS ? APT_DEADLINE - SECONDS : 1))" \
            "$@" >&2 2>"$errors" || rc=$?
        cat "$errors" >&2
        if [ "$rc" -ne 0 ] && grep -q "Could not get lock" "$errors"; then
            if [ "$SECONDS" -lt "$APT_DEADLINE" ]; then continue; fi
            rm -f "$errors"
            echo "setup: error: apt-get could not get its lock within ${APT_LOCK_TIMEOUT}s (see above)" >&2
            exit 1
        fi
        rm -f "$errors"
        return "$rc"
    done
}

if ((${#need_apt[@]})); then
    echo "setup: installing apt packages: ${need_apt[*]}" >&2
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    APT_DEADLINE=$((SECONDS + APT_LOCK_TIMEOUT))
    apt_get update -qq
    apt_get install -y -qq "${need_apt[@]}"
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
    echo "setup: installing pkfuse and its test and plot extras into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --upgrade pip >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT[test,plot]" >&2
    echo "$want" > "$stamp"
fi
# Bytecode for pkfuse's own modules: an editable install compiles none, and
# where PYTHONDONTWRITEBYTECODE is set every daemon start would compile
# ~8,000 lines again (~60 ms of a mount). compileall skips current .pyc files.
"$VENV/bin/python" -m compileall -q "$ROOT/backing" "$ROOT/pkfuse" >&2
# The VMM's guest program: build/guest/guest.bin from guest/ with gcc, ld and
# objcopy. pkfuse/vmm/guest.py holds the one recipe; it rebuilds only when a
# source (or the recipe) changed and prints nothing when the binary is current.
if ! guest_error="$("$VENV/bin/python" -m pkfuse.vmm.guest 2>&1)"; then
    echo "setup: error: ${guest_error##*$'\n'}" >&2
    exit 1
fi
