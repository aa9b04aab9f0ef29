"""What every restart cycle verifies, one ``check_<what>`` function each, each giving a ``Check``.

- ``check_guest_clean``: the verifier (``pkfuse.vmm.verify``) finds nothing in guest RAM read in
  place from the image with the vCPUs paused -- after the freeze, before the jump, its state, rings
  and records (``dirty=False``: the blackout's part); after finish, all of RAM at a pause; and at
  the final stop;
- ``check_guest_continued``: ``progressed(before, after, advanced=True)`` is empty: every counter
  continues from where the freeze left it (and the freeze from the last verdict), and every vCPU
  stepped again -- nothing the guest wrote before the jump is lost (its dirty pages: the guest
  checks each before it rewrites it, a lost one stops it with ERROR_LOST, and the verdict after
  finish checks the rest);
- ``check_guest_running``: right after finish, the successor's ``status``: no guest error, every
  vCPU's counter already past the frozen one;
- ``check_translations``: every mapped IOVA (each 4 KiB page of guest RAM, IOVA = GPA) translates
  for the device's requester id, walked from the image, the ephemeral memory and the register
  block as hardware walks them (``tables.device_view``), to the same physical address before the
  jump and after finish;
- ``check_session_finished``: the daemon's status says ``0 sessions``;
- ``check_no_saved_copy``: no domain flagged ``saved`` (the ephemeral design's fixed copy) is left
  after finish;
- ``check_pages``: the image's free pages after finish are what they were before prepare (the
  saved copy, the session's records: nothing leaked);
- ``check_cancel``: after a cancelled prepare the session is gone and domains, mappings and
  translations are as they were;
- ``check_ephemeral_poisoned`` (ephemeral design): the new daemon's open poisoned the ephemeral
  memory (its ``boot_id`` went up by one across the jump);
- with the device: ``check_dma_faults`` (none in the cycle's live update), ``check_dma_reached_guest``
  (every DMA it made, through its own context cache and IOTLB, reached the guest file's page for
  its IOVA: no stale or misdirected translation, in the live update and over the whole run) and
  ``check_records_advanced`` (its free-running writer stamped records inside the blackout);
- after a translation change (a test's, through backing's ``Iommu``): ``check_no_stale_dma`` (no DMA
  logged after it reached a page the tables no longer give for its IOVA: ``stale_after``, the
  "after the change" form of ``misdirected``; both are ``astray`` against a page map);
- at the end: ``check_fsck`` (``backing.fsck.check_image`` clean: its pool checks find no page
  leaked or owned twice).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np

from backing import format as fmt
from backing import fsck
from pkfuse.vmm import abi, verify

from . import tables
from .cast import Cast
from .device import IOTLB_HIT


@dataclasses.dataclass
class Check:
    """One verified property: its name, whether it held, what was found."""

    name: str
    ok: bool
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Translations:
    """Where each mapped IOVA went, for one requester."""

    iovas: np.ndarray
    phys: np.ndarray
    fault: np.ndarray


def translations(cast: Cast, sid: int) -> Translations:
    iovas = np.arange(0, cast.guest_size, fmt.PAGE_SIZE, dtype=np.uint64)
    phys, fault = tables.device_view(cast.image, sid, iovas)
    return Translations(iovas, phys, fault)


def verdict(cast: Cast) -> verify.Verdict:
    """The verifier over guest RAM read from the image (the vCPUs must be paused or gone)."""
    return verify.verify(cast.guest_view())


def paused_verdict(cast: Cast) -> verify.Verdict:
    """``verdict`` of the running VM at a pause of its vCPUs (monitor ``pause``, then ``continue``):
    off any blackout, all of RAM, what the guest and the device wrote, page by page."""
    assert cast.vmm_monitor is not None
    cast.monitor(cast.vmm_monitor, "pause")
    try:
        return verdict(cast)
    finally:
        cast.monitor(cast.vmm_monitor, "continue")


def check_guest_clean(v: verify.Verdict, when: str) -> Check:
    if v.ok:
        return Check(f"guest memory clean {when}", True, v.summary())
    return Check(f"guest memory clean {when}", False, "; ".join(str(f) for f in v.findings[:3])
                 + (f" (+{len(v.findings) - 3} more)" if len(v.findings) > 3 else ""))


def check_guest_continued(before: verify.Verdict, after: verify.Verdict) -> Check:
    went_back = verify.progressed(before, after, advanced=True)
    steps = [a.counter - b.counter for b, a in zip(before.vcpus, after.vcpus)]
    if went_back:
        return Check("guest continued", False, "; ".join(str(f) for f in went_back[:3]))
    return Check("guest continued", True, f"steps since the freeze {steps}")


def check_guest_running(before: verify.Verdict, status: dict[str, Any], *, cold_boot: bool = False) -> Check:
    """Right after finish (or a cold boot after a crash): no guest error, every counter past ``before``'s
    (a cold boot continues from RAM: at least where the last verdict saw it)."""
    name = "guest running after a cold boot" if cold_boot else "guest running after finish"
    errors = status.get("guest_errors") or {}
    if errors:
        names = {int(k): abi.ERROR_NAMES.get(int(v), str(v)) for k, v in errors.items()}
        return Check(name, False, f"guest errors {names}")
    frozen = [v.counter for v in before.vcpus]
    now = list(status.get("counters", []))
    if len(now) != len(frozen) or any(n < f if cold_boot else n <= f for n, f in zip(now, frozen)):
        return Check(name, False, f"counters {now}, {'last seen' if cold_boot else 'frozen'} at {frozen}")
    return Check(name, True, f"counters {now}")


def check_translations_reach_guest(cast: Cast, t: Translations, when: str) -> Check:
    """Every IOVA (= GPA) reaches the guest file's own page for it (its extents, from the daemon)."""
    want = np.zeros(t.iovas.size, np.uint64)
    for off, phys, length in cast.extents:
        lo, hi = off // fmt.PAGE_SIZE, min((off + length) // fmt.PAGE_SIZE, t.iovas.size)
        want[lo:hi] = phys + np.arange(hi - lo, dtype=np.uint64) * np.uint64(fmt.PAGE_SIZE)
    bad = np.flatnonzero((t.fault != 0) | (t.phys != want))
    name = f"DMA reaches guest RAM {when}"
    if bad.size:
        i = int(bad[0])
        got = (f"fault {fmt.FR_NAMES.get(int(t.fault[i]), t.fault[i])}" if t.fault[i] else f"{int(t.phys[i]):#x}")
        return Check(name, False, f"{bad.size} of {t.iovas.size} IOVAs do not, first {int(t.iovas[i]):#x}: "
                                  f"{got}, the guest file's page is {int(want[i]):#x}")
    return Check(name, True, f"{t.iovas.size} IOVAs, each to its guest page")


def check_translations(before: Translations, after: Translations) -> Check:
    name = "translations before = after"
    bad_before = np.flatnonzero(before.fault)
    if bad_before.size:
        i = int(bad_before[0])
        return Check(name, False, f"{bad_before.size} mapped IOVAs fault before the jump, first {int(before.iovas[i]):#x} "
                                  f"({fmt.FR_NAMES.get(int(before.fault[i]), before.fault[i])})")
    bad = np.flatnonzero((after.fault != 0) | (after.phys != before.phys))
    if bad.size:
        i = int(bad[0])
        got = (f"fault {fmt.FR_NAMES.get(int(after.fault[i]), after.fault[i])}" if after.fault[i]
               else f"{int(after.phys[i]):#x}")
        return Check(name, False, f"{bad.size} of {before.iovas.size} IOVAs differ, first {int(before.iovas[i]):#x}: "
                                  f"{int(before.phys[i]):#x} before, {got} after")
    return Check(name, True, f"{before.iovas.size} IOVAs")


def sessions(cast: Cast) -> str:
    """The ``N sessions...`` part of the status's ``liveupdate:`` line."""
    line = cast.status("liveupdate")
    m = re.search(r"\d+ sessions.*", line)
    return m.group(0) if m else line


def check_session_finished(cast: Cast, *, refused_ok: bool = False) -> Check:
    """``0 sessions``; with ``refused_ok`` (after an unplanned crash) a session the new daemon refused --
    one it could not restore whole, its device blocked, never adopted -- is allowed, and named."""
    s = sessions(cast)
    if refused_ok and not s.startswith("0 sessions"):
        listed = s.partition(": ")[2].split(", ")
        if listed and all(item.endswith(" refused") for item in listed):
            return Check("no session left but refused ones", True, s)
        return Check("no session left but refused ones", False, s)
    return Check("session finished", s.startswith("0 sessions"), s)


def saved_domains(cast: Cast) -> list[str]:
    return [line.split(":")[0] for line in cast.iommu_text().splitlines() if re.search(r", compatible \S+ saved,", line)]


def check_no_saved_copy(cast: Cast) -> Check:
    left = saved_domains(cast)
    return Check("no saved copy after finish", not left, ", ".join(left) or "none")


def check_bystander(cast: Cast) -> Check:
    """No page outside the VM's own files changed: the VMM's image fd reaches the whole image."""
    return Check("no page outside the VM's files changed (the bystander file's pages, read from the image)",
                 cast.bystander_intact(), f"{sum(n for _, n in cast.bystander)} bytes in {len(cast.bystander)} "
                                          "extents")


def check_pages(before: int, after: int) -> Check:
    return Check("no page leaked by the cycle", before == after,
                 f"pages_free {before} before prepare, {after} after finish")


def domain_lines(cast: Cast) -> list[str]:
    """The domains with their requesters and mappings (``.pkernfs/iommu`` up to the iommufd objects)."""
    out = []
    for line in cast.iommu_text().splitlines():
        if line.startswith("iommufd:"):
            break
        if not line.startswith("translation "):  # the fault count may move
            out.append(line)
    return out


def check_cancel(cast: Cast, domains_before: list[str], before: Translations, after: Translations) -> list[Check]:
    checks = [Check("cancel: no session left", sessions(cast).startswith("0 sessions"), sessions(cast))]
    now = domain_lines(cast)
    diff = [line for line in now if line not in domains_before] + [line for line in domains_before if line not in now]
    checks.append(Check("cancel: domains as they were", not diff, "; ".join(diff[:3]) or "unchanged"))
    t = check_translations(before, after)
    checks.append(Check("cancel: translations as they were", t.ok, t.detail))
    return checks


def ephemeral_boot(cast: Cast) -> int | None:
    """The ephemeral memory's ``boot_id`` (+1 at every poison), None without the file."""
    from backing.ephemeral import EPHEMERAL_HEADER_DTYPE, default_path

    try:
        with open(default_path(cast.image), "rb") as f:
            raw = f.read(EPHEMERAL_HEADER_DTYPE.itemsize)
    except FileNotFoundError:
        return None
    return int(np.frombuffer(raw, EPHEMERAL_HEADER_DTYPE)[0]["boot_id"])


def check_ephemeral_poisoned(before: int | None, after: int | None, poisons: int = 1) -> Check:
    """The new daemon's open poisoned the ephemeral memory: its boot went up by one per restore since
    the jump (``poisons``: a restore cut by a kill poisoned it too, maybe before it died)."""
    ok = before is not None and after is not None and before + 1 <= after <= before + poisons
    return Check("ephemeral memory poisoned at restore", ok, f"boot {before} before the jump, {after} after")


def check_crash_translations(flow: str, before: Translations, between: Translations) -> Check:
    """After an unplanned crash, before any VMM: pkernfs kept every translation (domain and context
    entry are in the image); the review's design must block the device (its domain was in host RAM:
    the new daemon clears a context entry into poisoned memory), every IOVA faulting, none astray."""
    if flow == "persistent":
        t = check_translations(before, between)
        return Check("DMA translation kept through the crash", t.ok, t.detail)
    name = "device blocked after the crash"
    reached = np.flatnonzero(between.fault == 0)
    if reached.size:
        i = int(reached[0])
        return Check(name, False, f"{reached.size} of {between.iovas.size} IOVAs still translate, first "
                                  f"{int(between.iovas[i]):#x} to {int(between.phys[i]):#x}")
    kinds = sorted({fmt.FR_NAMES.get(int(f), str(int(f))) for f in np.unique(between.fault)})
    return Check(name, True, f"all {between.iovas.size} IOVAs fault ({', '.join(kinds)})")


def check_dma_faults(entries: np.ndarray, start_mono: int, end_mono: int, when: str = "in the live update") -> Check:
    """No DMA of the device faulted between ``start_mono`` and ``end_mono`` (CLOCK_MONOTONIC, the log's)."""
    w = entries[(entries["time_ns"] >= start_mono) & (entries["time_ns"] <= end_mono)]
    faulted = w[w["fault"] != 0]
    name = f"no DMA fault {when}"
    if faulted.size:
        f = faulted[0]
        return Check(name, False,
                     f"{faulted.size} of {w.size} DMAs faulted, first at IOVA {int(f['iova']):#x}: "
                     f"{fmt.FR_NAMES.get(int(f['fault']), int(f['fault']))}")
    return Check(name, True, f"{w.size} DMAs")


def guest_pages(extents: list[tuple[int, int, int]], size: int) -> np.ndarray:
    """The physical address of each 4 KiB page of a guest of ``size`` bytes (IOVA = GPA = file offset),
    from the guest file's ``(offset, phys, length)`` extents; 0 where no extent covers the page."""
    pages = size // fmt.PAGE_SIZE
    page_phys = np.zeros(pages, np.uint64)
    for off, phys, length in extents:
        lo, hi = off // fmt.PAGE_SIZE, min((off + length) // fmt.PAGE_SIZE, pages)
        page_phys[lo:hi] = phys + np.arange(hi - lo, dtype=np.uint64) * np.uint64(fmt.PAGE_SIZE)
    return page_phys


def astray(entries: np.ndarray, pages: np.ndarray) -> np.ndarray:
    """The performed DMAs of the log that reached another physical address than ``pages`` gives for
    their IOVA (``pages[iova >> 12]`` plus the offset in the page; where ``pages`` holds 0, or past its
    end, nothing may be reached at all): a boolean per entry."""
    done = entries["done"] == 1
    iova = entries["iova"]
    page = iova >> np.uint64(fmt.PAGE_SHIFT)
    inside = page < np.uint64(pages.size)
    want = np.zeros(entries.size, np.uint64)
    want[inside] = pages[page[inside].astype(np.int64)]
    mapped = want != 0
    want[mapped] += iova[mapped] & np.uint64(fmt.PAGE_SIZE - 1)
    return done & (~mapped | (entries["phys"] != want))


def misdirected(cast: Cast, entries: np.ndarray) -> np.ndarray:
    """The performed DMAs of the log that reached another physical address than the guest file's page
    for their IOVA (IOVA = GPA; the extents say where each page is): a boolean per entry."""
    return astray(entries, guest_pages(cast.extents, cast.guest_size))


def stale_after(entries: np.ndarray, since_mono: int, pages: np.ndarray) -> np.ndarray:
    """The DMAs logged at or after ``since_mono`` (CLOCK_MONOTONIC, the log's clock) that went astray of
    ``pages``, the translation as the tables give it after a change the driver finished before
    ``since_mono`` (its invalidation's wait included): each is a translation the device's context cache
    or IOTLB served stale -- the old page reached after an unmap or a remap."""
    return astray(entries, pages) & (entries["time_ns"] >= np.uint64(since_mono))


def check_no_stale_dma(entries: np.ndarray, since_mono: int, pages: np.ndarray, when: str) -> Check:
    """No DMA after a translation change (``stale_after``) reached what the tables no longer map there."""
    bad = stale_after(entries, since_mono, pages)
    name = f"no stale DMA {when}"
    later = int((entries["time_ns"] >= np.uint64(since_mono)).sum())
    if bad.any():
        e = entries[np.flatnonzero(bad)[0]]
        hits = int((entries["iotlb"][bad] == IOTLB_HIT).sum())
        return Check(name, False, f"{int(bad.sum())} of {later} DMAs since the change reached a page the tables no "
                                  f"longer give ({hits} served by the IOTLB), first IOVA {int(e['iova']):#x} -> "
                                  f"{int(e['phys']):#x}")
    return Check(name, True, f"{later} DMAs since the change, each where the tables say")


def check_dma_reached_guest(cast: Cast, entries: np.ndarray, when: str) -> Check:
    """Every DMA the device made (through its own IOTLB) reached the guest page its IOVA names."""
    bad = misdirected(cast, entries)
    name = f"no misdirected DMA {when}"
    if bad.any():
        e = entries[np.flatnonzero(bad)[0]]
        return Check(name, False, f"{int(bad.sum())} of {entries.size} DMAs went astray, first IOVA {int(e['iova']):#x} "
                                  f"reached {int(e['phys']):#x}")
    return Check(name, True, f"{int((entries['done'] == 1).sum())} DMAs, each at its guest page")


def check_records_advanced(stamped_in_blackout: int) -> Check:
    return Check("device records advanced through the blackout", stamped_in_blackout > 0,
                 f"{stamped_in_blackout} records stamped while the vCPUs were paused")


def check_fsck(cast: Cast) -> Check:
    status, findings = fsck.check_image(cast.image)
    if status == 0 and not findings:
        return Check("fsck clean", True, "no finding (pool: no page leaked or owned twice)")
    return Check("fsck clean", False, f"status {status}: " + "; ".join(str(f) for f in findings[:3]))


__all__ = ["Check", "Translations", "translations", "verdict", "paused_verdict", "check_guest_clean", "check_guest_continued",
           "check_guest_running", "check_translations", "check_translations_reach_guest", "check_session_finished", "check_no_saved_copy",
           "check_pages", "check_cancel", "check_ephemeral_poisoned", "check_dma_faults", "check_dma_reached_guest",
           "check_records_advanced", "check_fsck", "guest_pages", "astray", "misdirected", "stale_after",
           "check_no_stale_dma", "check_crash_translations"]
