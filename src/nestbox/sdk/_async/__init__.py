"""The async client (the source `_codegen.py` turns into `_sync`)."""
