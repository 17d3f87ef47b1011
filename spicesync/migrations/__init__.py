"""Versioned App DB migrations: ``NNNN_name.sql`` files applied in order, each exactly once."""
