"""The local stack: the real Temporal dev server, PostgreSQL and the SpiceDB engine."""
