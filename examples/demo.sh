#!/usr/bin/env bash
# pkfuse demo: an image standing in for reserved physical memory, a guest-RAM
# file in it, inspection with ordinary tools, then a restart (kill -9 of the
# daemon) after which the guest's memory is still there.
#
# Runnable on its own with `pkfuse` on PATH (scripts/run demo sets that up).
# Everything happens in a temporary directory that is removed at the end; a
# trap unmounts and kills the daemon if any step fails.
set -euo pipefail

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pkfuse-demo.XXXXXX")"
IMG="$WORK/host.img"
MNT="$WORK/mnt"
LOG="$WORK/pkfuse.log"
MESSAGE="hello from the guest, written before the restart"
OFFSET=$((100 * 1024 * 1024 + 4096))   # 100 MiB + one page into guest RAM

section() { printf '\n==== %s ====\n' "$*"; }
run() { printf '$ %s\n' "$*"; "$@"; }
daemon_pid() { awk '$1 == "daemon_pid:" {print $2}' "$MNT/.pkernfs/status" 2>/dev/null || true; }

cleanup() {
    local status=$?
    if mountpoint -q "$MNT" 2>/dev/null || grep -qs " $MNT " /proc/self/mountinfo; then
        local pid
        pid="$(daemon_pid)"
        fusermount3 -u "$MNT" 2>/dev/null || fusermount3 -u -z "$MNT" 2>/dev/null || true
        if [ -n "$pid" ]; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -rf "$WORK"
    if [ "$status" -ne 0 ]; then
        echo "demo FAILED (status $status); daemon log was printed above if any" >&2
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$MNT"

section "1. make a 1 GiB image (the reserved physical range, base 4 GiB)"
run pkfuse mkfs "$IMG" --size 1G

section "2. mount it (the daemon returns once the mount answers)"
run pkfuse mount --log "$LOG" "$IMG" "$MNT"
run ls -la "$MNT"

section "3. guest RAM: truncate allocates every page at once"
run truncate -s 256M "$MNT/guest_mem/vm0"
run ls -l "$MNT/guest_mem"
run stat "$MNT/guest_mem/vm0"
run df -h "$MNT"

section "4. write a recognizable string at offset $OFFSET with dd, read it back"
printf '%s' "$MESSAGE" | dd of="$MNT/guest_mem/vm0" bs=4096 seek=$((OFFSET / 4096)) conv=notrunc status=none
printf '$ dd if=%s bs=4096 skip=%d count=1 | head -c %d\n' "$MNT/guest_mem/vm0" $((OFFSET / 4096)) ${#MESSAGE}
dd if="$MNT/guest_mem/vm0" bs=4096 skip=$((OFFSET / 4096)) count=1 status=none | head -c ${#MESSAGE}
echo

section "5. where it lives: physical layout, status, memory map"
run getfattr -d --absolute-names "$MNT/guest_mem/vm0"
run cat "$MNT/.pkernfs/status"
run cat "$MNT/.pkernfs/memmap"

section "6. the restart: kill -9 the daemon at this instant"
PID="$(daemon_pid)"
run kill -9 "$PID"
for _ in $(seq 200); do   # gone, or a zombie nobody reaped yet
    [ -e "/proc/$PID" ] && ! grep -qs ') Z' "/proc/$PID/stat" || break
    sleep 0.05
done
echo "daemon $PID is gone; the mount is dead:"
ls "$MNT" 2>&1 | sed 's/^/  /' || true
run fusermount3 -u -z "$MNT"

section "7. mount again and read the guest's memory"
run pkfuse mount --log "$LOG" "$IMG" "$MNT"
echo "new daemon: $(daemon_pid); $(grep '^generation:' "$MNT/.pkernfs/status")"
GOT="$(dd if="$MNT/guest_mem/vm0" bs=4096 skip=$((OFFSET / 4096)) count=1 status=none | head -c ${#MESSAGE})"
if [ "$GOT" != "$MESSAGE" ]; then
    echo "LOST: read back '$GOT'" >&2
    cat "$LOG" >&2
    exit 1
fi
echo "survived: $GOT"

section "8. unmount and check the image"
run pkfuse umount "$MNT"
if pkfuse fsck --help >/dev/null 2>&1; then
    run pkfuse fsck "$IMG"
fi
if grep -q Traceback "$LOG"; then
    echo "the daemon logged a traceback:" >&2
    cat "$LOG" >&2
    exit 1
fi
echo
echo "demo complete"
