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
# shown as typed, pipe included (run() would show only the printf)
printf "\$ printf %%s '%s' | dd of=%s bs=4096 seek=%d conv=notrunc status=none\n" \
    "$MESSAGE" "$MNT/guest_mem/vm0" $((OFFSET / 4096))
printf '%s' "$MESSAGE" | dd of="$MNT/guest_mem/vm0" bs=4096 seek=$((OFFSET / 4096)) conv=notrunc status=none
printf '$ dd if=%s bs=4096 skip=%d count=1 status=none | head -c %d\n' "$MNT/guest_mem/vm0" $((OFFSET / 4096)) \
    ${#MESSAGE}
READ="$(dd if="$MNT/guest_mem/vm0" bs=4096 skip=$((OFFSET / 4096)) count=1 status=none | head -c ${#MESSAGE})"
echo "$READ"
[ "$READ" = "$MESSAGE" ] || { echo "the write did not read back: '$READ'" >&2; exit 1; }

section "5. where it lives: physical layout, status, memory map"
run getfattr -d --absolute-names "$MNT/guest_mem/vm0"
run cat "$MNT/.pkernfs/status"
run cat "$MNT/.pkernfs/memmap"

IOVA=0x100000000
if pkfuse iommu --help >/dev/null 2>&1; then
    HAVE_IOMMU=1
    section "6. a device: program the IOMMU (the kernel's role, image unmounted), mount again"
    run pkfuse umount "$MNT"
    run pkfuse iommu create "$IMG"
    run pkfuse iommu map "$IMG" 1 --iova $IOVA --length 256M --file guest_mem/vm0
    run pkfuse iommu attach "$IMG" 1 00:03.0
    run pkfuse iommu enable "$IMG"
    run pkfuse mount --log "$LOG" "$IMG" "$MNT"
    run ls -l "$MNT/iommu"
    run cat "$MNT/.pkernfs/iommu"
    echo "the hardware walks the tables in the image (works while mounted):"
    DMA_ADDR=$((IOVA + OFFSET))
    run pkfuse iommu translate "$IMG" 00:03.0 "$(printf '%#x' $DMA_ADDR)"
    BEFORE="$(pkfuse iommu translate "$IMG" 00:03.0 "$(printf '%#x' $DMA_ADDR)")"
    echo "a simulated DMA: the device writes 8 KiB further on, at the physical address the walk gives;"
    echo "the mount reads the image's current bytes (direct_io), so the guest file shows it at once:"
    DMA_IOVA="$(printf '%#x' $((DMA_ADDR + 8192)))"
    PHYS="$(pkfuse iommu translate --write "$IMG" 00:03.0 "$DMA_IOVA" | awk '{print $3}')"
    BASE="$(awk '$1 == "base_phys:" {print $2}' "$MNT/.pkernfs/status")"
    printf 'written by the device' | dd of="$IMG" bs=1 seek=$((PHYS - BASE)) conv=notrunc status=none
    printf '$ dd if=%s bs=1 skip=%d count=21\n' "$MNT/guest_mem/vm0" $((OFFSET + 8192))
    SEEN="$(dd if="$MNT/guest_mem/vm0" bs=1 skip=$((OFFSET + 8192)) count=21 status=none)"
    echo "$SEEN"
    [ "$SEEN" = "written by the device" ] || { echo "the mount did not show the DMA" >&2; exit 1; }
else
    HAVE_IOMMU=0
    echo "(pkfuse iommu not available in this build: skipping the IOMMU part)"
fi

section "7. the restart: kill -9 the daemon at this instant"
PID="$(daemon_pid)"
run kill -9 "$PID"
for _ in $(seq 200); do   # gone, or a zombie nobody reaped yet
    [ -e "/proc/$PID" ] && ! grep -qs ') Z' "/proc/$PID/stat" || break
    sleep 0.05
done
echo "daemon $PID is gone; the mount is dead:"
ls "$MNT" 2>&1 | sed 's/^/  /' || true
run fusermount3 -u -z "$MNT"

section "8. mount again and read the guest's memory"
run pkfuse mount --log "$LOG" "$IMG" "$MNT"
echo "new daemon: $(daemon_pid); $(grep '^generation:' "$MNT/.pkernfs/status")"
GOT="$(dd if="$MNT/guest_mem/vm0" bs=4096 skip=$((OFFSET / 4096)) count=1 status=none | head -c ${#MESSAGE})"
if [ "$GOT" != "$MESSAGE" ]; then
    echo "LOST: read back '$GOT'" >&2
    cat "$LOG" >&2
    exit 1
fi
echo "survived: $GOT"
if [ "$HAVE_IOMMU" = 1 ]; then
    AFTER="$(pkfuse iommu translate "$IMG" 00:03.0 "$(printf '%#x' $DMA_ADDR)")"
    if [ "$AFTER" != "$BEFORE" ]; then
        echo "IOMMU translation changed across the restart: '$BEFORE' -> '$AFTER'" >&2
        exit 1
    fi
    echo "device DMA still translates: $AFTER"
fi

section "9. unmount and check the image"
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
