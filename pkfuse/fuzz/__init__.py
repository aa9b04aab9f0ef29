"""``pkfuse fuzz``: hostile input at the daemon's trust boundaries, measured (issue 14).

One module per target: ``requests`` (the control socket). Each drives a real
mounted daemon, compares every answer with a model, checks the invariants
after every sequence and reports what it tried.
"""
