"""The ``spicesync`` command line."""
