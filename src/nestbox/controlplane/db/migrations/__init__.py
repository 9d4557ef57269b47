"""Alembic migrations of the control plane database (applied at start by `Database.migrate`)."""
