"""The blocking client, generated from `_async` by `_codegen.py` (do not edit `client.py`)."""
