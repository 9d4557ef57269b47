"""Nestbox: self-hostable microVM sandboxes (capsules)."""

__version__ = "0.1.0"
