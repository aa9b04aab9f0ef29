"""The restart test's figure: the blackout of every cycle, part by part, both designs side by side.

One job: a PNG from a ``Report`` (``pkfuse restart-test --plot FILE.png``). One panel per flow
the report holds (persistent, then ephemeral), sharing the y axis so the designs compare at a
glance; in each, a stacked bar per cycle of the blackout's parts (``cycle.BLACKOUT_PARTS``, in
ms, from ``Cycle.blackout()``) -- the harness's own ``snapshot`` hatched, since a kexec does not
pay it --; one legend for the figure; the title names guest size, vCPUs, engine and successors.
A cycle that failed a check has its bar outlined in red, its tick label in red and "failed" above
it; a cycle with no blackout measured (the run ended inside it) has an empty bar marked "no
blackout".

``bars`` is the figure's data, pure and without matplotlib (what the tests compare with the
cycles); ``write_png`` draws it with matplotlib's Agg backend, imported only there;
``require_matplotlib`` is the check the command line makes before any cycle runs.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from .cycle import BLACKOUT_PARTS
from .report import Report

FLOWS = ("persistent", "ephemeral")  #: panel order, left to right
DPI = 100
PANEL_WIDTH_IN = 5.0  #: inches per panel
LEGEND_WIDTH_IN = 1.6  #: inches for the legend on the right
HEIGHT_IN = 4.8
#: one colour per part, in BLACKOUT_PARTS' order (matplotlib's tab10, snapshot grey: the harness's own)
COLOURS = {"freeze": "#1f77b4", "snapshot": "#bbbbbb", "jump": "#d62728", "mount": "#ff7f0e", "wait": "#e7ba52",
           "retrieve": "#2ca02c", "remap": "#9467bd", "vm_create": "#8c564b", "vcpu_restore": "#17becf"}
assert set(COLOURS) == set(BLACKOUT_PARTS)
MiB = 1 << 20


class PlotUnavailable(ValueError):
    """``--plot`` asked for where matplotlib cannot be imported (a one-line error)."""


@dataclasses.dataclass(frozen=True)
class FlowBars:
    """One panel: per cycle of ``flow`` (in run order) its index, each part's height in ms, its verdict."""

    flow: str
    cycles: list[int]
    heights: dict[str, list[float]]  #: part -> ms per cycle (0 where no blackout was measured)
    failed: list[bool]
    measured: list[bool]  #: whether the cycle has a blackout (paused and resumed edges)
    cancel: list[bool]

    def totals(self) -> list[float]:
        return [sum(self.heights[p][i] for p in BLACKOUT_PARTS) for i in range(len(self.cycles))]


def bars(report: Report) -> list[FlowBars]:
    """The figure's data: a ``FlowBars`` per flow present in ``report``, in ``FLOWS`` order."""
    out = []
    present = {c.flow for c in report.cycles}
    for flow in [f for f in FLOWS if f in present] + sorted(present - set(FLOWS)):
        mine = [c for c in report.cycles if c.flow == flow]
        blackouts = [c.blackout() for c in mine]
        out.append(FlowBars(flow, [c.index for c in mine],
                            {p: [b.get(p, 0.0) * 1e3 for b in blackouts] for p in BLACKOUT_PARTS},
                            [not c.ok for c in mine], [bool(b) for b in blackouts], [c.cancel for c in mine]))
    return out


def title(report: Report) -> str:
    """Guest size, vCPUs, engine (the one the VMMs ran on, when a cycle reported it), successors."""
    cfg = report.config
    size = int(cfg.get("guest_size", 0))
    shown = f"{size >> 30} GiB" if size and size % (1 << 30) == 0 else f"{size // MiB} MiB"
    engines = sorted({c.engine for c in report.cycles if c.engine})
    engine = "/".join(engines) or str(cfg.get("engine", "?"))
    vcpus = int(cfg.get("vcpus", 1))
    return (f"restart-test blackout: {shown} guest, {vcpus} vCPU{'s' if vcpus != 1 else ''}, {engine}, "
            f"successors {cfg.get('successors', '?')}")


def figure_size(panels: int) -> tuple[int, int]:
    """The PNG's (width, height) in pixels for ``panels`` panels (at least one)."""
    return round((max(panels, 1) * PANEL_WIDTH_IN + LEGEND_WIDTH_IN) * DPI), round(HEIGHT_IN * DPI)


def require_matplotlib() -> None:
    """Raise ``PlotUnavailable`` (one line) if matplotlib cannot be imported here."""
    try:
        importlib.import_module("matplotlib")
    except ImportError as exc:  # also a sys.modules entry of None
        raise PlotUnavailable(f"--plot needs matplotlib, which cannot be imported here ({exc}): install "
                              "pkfuse's plot extra (pip install 'pkfuse[plot]')") from None


def write_png(report: Report, path: str) -> tuple[int, int]:
    """Draw ``report`` into the PNG ``path``; its (width, height) in pixels."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot state, no GUI backend
    from matplotlib.patches import Patch

    data = bars(report)
    width, height = figure_size(len(data))
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, max(len(data), 1), sharey=True, squeeze=False)[0]
    fig.suptitle(title(report), fontsize="medium")
    if not data:
        axes[0].text(0.5, 0.5, "no cycle ran" + (f":\n{report.aborted}" if report.aborted else ""),
                     ha="center", va="center", wrap=True, transform=axes[0].transAxes)
        axes[0].set_axis_off()
    top = max((t for fb in data for t in fb.totals()), default=0.0)
    for ax, fb in zip(axes, data):
        _panel(ax, fb, top)
    axes[0].set_ylabel("blackout (ms)")
    handles: list[Any] = []
    for part in reversed(BLACKOUT_PARTS):  # top to bottom, as the parts are stacked
        handles.append(Patch(facecolor=COLOURS[part], edgecolor="black", linewidth=0.3,
                             hatch="//" if part == "snapshot" else None, label=part.replace("_", " ")))
    fig.legend(handles=handles, loc="outside right center", title="part", fontsize="small",
               title_fontsize="small")
    fig.savefig(path, format="png", dpi=DPI)
    return width, height


def _panel(ax: Any, fb: FlowBars, top: float) -> None:
    n = len(fb.cycles)
    x = list(range(n))
    bottom = [0.0] * n
    for part in BLACKOUT_PARTS:
        h = fb.heights[part]
        ax.bar(x, h, bottom=bottom, width=0.7, color=COLOURS[part], edgecolor="black", linewidth=0.3,
               hatch="//" if part == "snapshot" else None)
        bottom = [b + v for b, v in zip(bottom, h)]
    bad = [i for i in x if fb.failed[i] and fb.measured[i]]
    if bad:  # a failed cycle's bar outlined in red, whether or not its tick is labelled
        ax.bar(bad, [bottom[i] for i in bad], width=0.7, fill=False, edgecolor="red", linewidth=1.5)
    ok = sum(not f for f in fb.failed)
    ax.set_title(f"{fb.flow}: {ok}/{n} cycles ok", fontsize="medium")
    ax.set_xlabel("cycle" + (" (c: after a cancelled prepare)" if any(fb.cancel) else ""))
    step = max(1, -(-n // 25))  # at most ~25 labels
    ticks = x[::step]
    ax.set_xticks(ticks, [f"{fb.cycles[i]}{'c' if fb.cancel[i] else ''}" for i in ticks])
    for label, i in zip(ax.get_xticklabels(), ticks):
        if fb.failed[i]:
            label.set_color("red")
    pad = max(top, 1.0) * 0.02
    for i in x:
        if not fb.measured[i]:
            ax.text(i, pad, "no blackout", ha="center", va="bottom", fontsize="small", rotation=90)
        elif fb.failed[i]:
            ax.text(i, bottom[i] + pad, "failed", ha="center", va="bottom", fontsize="small", color="red",
                    rotation=90)
    ax.set_ylim(0, max(top, 1.0) * 1.15)
    ax.grid(axis="y", linewidth=0.3)
    ax.set_axisbelow(True)


__all__ = ["FlowBars", "PlotUnavailable", "bars", "figure_size", "require_matplotlib", "title", "write_png"]
