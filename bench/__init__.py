"""``spicesync bench``: spicesync measured side by side with the ways it replaces.

Everything here is benchmark code, kept apart from the product: an open-loop load generator
(:mod:`bench.harness`), one module per system under test, the 100,000-user backfill comparison
(:mod:`bench.backfill`) and the report writer (:mod:`bench.report`).
"""
