"""The restart test's report: per cycle and in total, as JSON, as summary lines, as one line of error.

Per cycle: the blackout (vCPUs paused -> resumed, the successor's own ``blackout``) and its parts
-- ``freeze`` (the pause to the freeze's reply: save and ``reboot()``), ``jump`` (SIGKILL of the
daemon and the old VMM, the dead mount cleared), ``mount`` (the new daemon answering), ``wait``
(what the other parts leave of the blackout: the successor noticing the session, and, cold, its
start), ``retrieve``, ``remap``, ``vm_create``, ``vcpu_restore`` (the successor's) -- then, off the
blackout, ``rebuild`` and ``finish``; the DMA the device made and its faults; the bytes of guest
RAM verified; every check. In total: count, min / median / max of each part, faults, bytes, the
end checks (fsck). ``ok`` only when every check of every cycle and of the end held; otherwise
``error`` is the first failure in one line, naming the cycle and the check.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from typing import Any

from .checks import Check
from .cycle import BLACKOUT_PARTS, Cycle


@dataclasses.dataclass
class Report:
    config: dict[str, Any]
    cycles: list[Cycle] = dataclasses.field(default_factory=list)
    end: dict[str, list[Check]] = dataclasses.field(default_factory=dict)  #: flow -> the end checks
    device: dict[str, Any] = dataclasses.field(default_factory=dict)  #: flow -> the device's summary
    aborted: str | None = None  #: a part of the cast that did not do its part (one line)

    @property
    def ok(self) -> bool:
        return self.aborted is None and all(c.ok for c in self.cycles) \
            and all(ch.ok for checks in self.end.values() for ch in checks)

    def first_error(self) -> str | None:
        for c in self.cycles:
            for ch in c.failed():
                return f"cycle {c.index} ({c.flow}): {ch.name}: {ch.detail}"
        for flow, checks in self.end.items():
            for ch in checks:
                if not ch.ok:
                    return f"end of the {flow} run: {ch.name}: {ch.detail}"
        return self.aborted

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {"cycles": len(self.cycles), "cycles_ok": sum(c.ok for c in self.cycles),
                               "bytes_verified": sum(c.bytes_verified for c in self.cycles),
                               "dma_in_live_updates": sum(int(c.dma.get("dmas", 0)) for c in self.cycles),
                               "faults_in_live_updates": sum(int(c.dma.get("faults", 0)) for c in self.cycles)}
        for flow in sorted({c.flow for c in self.cycles}):
            mine = [c.blackout() for c in self.cycles if c.flow == flow and c.blackout()]
            if not mine:
                continue
            per: dict[str, Any] = {}
            for part in ("total", "without_snapshot", *BLACKOUT_PARTS):
                vals = [b[part] for b in mine]
                per[part] = {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}
            rebuild = [c.timings["rebuild"] for c in self.cycles if c.flow == flow and "rebuild" in c.timings]
            finish = [c.timings["finish"] for c in self.cycles if c.flow == flow and "finish" in c.timings]
            out[flow] = {"blackout_s": per,
                         "rebuild_s": {"median": statistics.median(rebuild)} if rebuild else {},
                         "finish_s": {"median": statistics.median(finish)} if finish else {}}
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "error": self.first_error(), "config": self.config,
                "cycles": [c.as_dict() for c in self.cycles], "total": self.totals(),
                "end": {flow: [c.as_dict() for c in checks] for flow, checks in self.end.items()},
                "device": self.device}

    def write_json(self, path: str) -> None:
        text = json.dumps(self.as_dict(), indent=2, default=str) + "\n"
        if path == "-":
            sys.stdout.write(text)
        else:
            with open(path, "w") as f:
                f.write(text)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def summary_lines(report: Report) -> list[str]:
    t = report.totals()
    lines = [f"{t['cycles_ok']}/{t['cycles']} cycles ok, {t['bytes_verified'] >> 20} MiB of guest RAM verified, "
             f"{t['faults_in_live_updates']} DMA faults in {t['dma_in_live_updates']} DMAs during live updates"]
    for flow in ("persistent", "ephemeral"):
        if flow in t:
            b = t[flow]["blackout_s"]
            lines.append(f"{flow}: blackout median {ms(b['total']['median'])} ms (min {ms(b['total']['min'])}, "
                         f"max {ms(b['total']['max'])}), {ms(b['without_snapshot']['median'])} ms without the "
                         "harness's snapshot; medians: " + ", ".join(
                             f"{k} {ms(b[k]['median'])}" for k in BLACKOUT_PARTS))
    for flow, checks in report.end.items():
        lines.append(f"end of {flow}: " + ", ".join(f"{c.name} {'ok' if c.ok else 'FAILED'}" for c in checks))
    for flow, dev in report.device.items():
        if "skipped" in dev:
            lines.append(f"device ({flow}): {dev['skipped']}")
    return lines


__all__ = ["Report", "summary_lines"]
