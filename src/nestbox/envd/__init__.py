"""envd: the daemon inside every capsule (processes, files, ports, snapshot quiesce)."""
