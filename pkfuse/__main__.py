"""``python -m pkfuse``: the same as the ``pkfuse`` command."""

from __future__ import annotations

from .cli import run

run()
