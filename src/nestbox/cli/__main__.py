"""`nestbox` / `python -m nestbox.cli`."""

from __future__ import annotations

from nestbox.cli.app import main

if __name__ == "__main__":
    main()
