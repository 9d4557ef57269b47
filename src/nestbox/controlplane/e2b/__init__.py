"""E2B compatibility (issue 16): E2B's REST API (`api.py`, `service.py`) and its envd gateway
(`gateway.py`), so the unmodified `e2b` SDK runs against Nestbox with `E2B_API_URL`,
`E2B_SANDBOX_URL` and `E2B_API_KEY` set to the control plane's URL and a Nestbox API key."""
