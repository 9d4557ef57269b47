"""Tiny helpers used by two or more programs; stdlib, anyio and protocol only."""
