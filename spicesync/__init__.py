"""spicesync: keep an application's PostgreSQL users and SpiceDB relationships in sync.

The shared package: constants, settings, models, errors, the application API
(:mod:`spicesync.client`) and the CLI. The saga itself lives in the top-level ``workflows``,
``activities``, ``workers`` and ``starters`` packages.
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
