"""The `nestbox` command-line client."""
