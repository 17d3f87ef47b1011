"""The ``spicesync`` command line: the one part of ``spicesync`` allowed to import upward."""
