"""The restart harness (issue 13, not built yet): kexec played in userspace around a running VM.

It will own the cast -- the daemon (the kernel), the VMM and its guest, the
simulated DMA device (hardware: it reads memory and the register block and
never asks the daemon) -- drive the live-update phases, SIGKILL the daemon
and the VMM at the jump, and verify guest memory, DMA and translations after
the restart. It will also be a pytest plugin giving users a running host
and a ``restart()``.
"""
