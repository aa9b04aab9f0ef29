"""``pkfuse fuzz``: hostile input at the daemon's trust boundaries, measured (issue 14).

One module per target: ``requests`` (the control socket, against a real
daemon and a model), ``sessions`` and ``images`` (what a restart reads back:
preserved sessions and domains tampered with structurally, or as raw bytes
there and in the metadata; run by ``cases`` on ``preserved``'s frozen
images and judged by the hardware's view). Each reports what it tried.
"""
