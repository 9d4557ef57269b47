"""The wire contract shared by the control plane, host agent and envd. No I/O here."""
