"""The `nestbox` command-line client, built on `nestbox.sdk` (Click for the commands, Rich
for tables and progress)."""
