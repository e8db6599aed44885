"""The load benchmark of the billing hot path (issue 4): run it with ``python -m bench.run``.

See bench/README.md for what it measures and how to read its results.
"""
