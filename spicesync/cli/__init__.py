"""The ``spicesync`` command line: the one part of ``spicesync`` allowed to import upward.

The rest of the shared package imports nothing from workflows, activities, workers, starters,
bench or chaos; the commands here drive all of them.
"""
