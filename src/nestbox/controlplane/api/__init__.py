"""The public HTTP API: one module per resource, each exporting a `router`. Handlers are thin:
parse (`deps.body`) → service → view (`deps.json`). `app.py` lists the routers."""
