"""The conformance battery: every combination of the registries' layer kinds, variants and quantizers (and
of model topologies) through every operation, each checked against an independent reference or refused in
one line. ``cases`` holds the axes, ``references`` the hand maths, ``operations`` the checks, ``matrix``
the generated docs/conformance.md; tests/test_conformance.py runs it."""
