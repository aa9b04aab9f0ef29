"""The restart harness (issue 13): kexec played in userspace around a running VM and its DMA device.

One module per job:

- ``cast``: the processes -- the daemon (the kernel), the VMM and its guest, the device
  (``device``: hardware, it never asks the daemon) -- started through the ``pkfuse`` command
  line, known by pid, and their cleanup from any state;
- ``cycle``: one restart cycle, LUO's phases (``Phase``) with a CLOCK_REALTIME timestamp at each
  edge; the jump (SIGKILL of the daemon and the VMM, the dead mount cleared) is one function;
- ``checks``: what every cycle verifies (guest memory, translations, the session, the saved copy,
  pages, DMA faults and records, fsck at the end), a ``Check`` each;
- ``tables``: what a requester reaches, walked as the hardware walks it;
- ``run``: a whole test, per design: the cast up, the cycles, the end checks, the cast down;
- ``report``: per cycle and in total, JSON, the summary lines, the one-line error;
- ``plot``: the figure of ``--plot``: each cycle's blackout, part by part, both designs side by side.

``pkfuse restart-test`` (``pkfuse/cli/restart.py``) is its command line. Next: ``--kill
PHASE|random`` (the jump inside another phase), the pytest plugin, ``pkfuse bench --only restart``.
"""
