"""Where the SDK and the CLI find the API: arguments first, then `NESTBOX_API_URL` /
`NESTBOX_API_KEY`, then the CLI's config file (`$XDG_CONFIG_HOME/nestbox/config.toml`, by
default `~/.config/nestbox/config.toml`, written by `nestbox login`, mode 0600)."""

from __future__ import annotations

import json
import os
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:9725"
ENV_URL = "NESTBOX_API_URL"
ENV_KEY = "NESTBOX_API_KEY"


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nestbox" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, str]:
    """The file's string settings; {} when there is none (a broken file is an error)."""
    path = path or config_path()
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {k: v for k, v in doc.items() if isinstance(v, str)}


def write_config(values: dict[str, str], path: Path | None = None) -> Path:
    """Write `values` (merged over what the file holds) atomically, 0600 from the start."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    merged = {**read_config(path), **values}
    # TOML basic strings take JSON's escapes for every character json.dumps emits.
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(merged.items()))
    fd, tmp = tempfile.mkstemp(prefix=".config-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Settings:
    api_url: str
    api_key: str | None


def resolve(
    api_url: str | None = None, api_key: str | None = None, config_file: Path | None = None
) -> Settings:
    """Each setting from the first place that has it: argument, environment, config file."""
    file = read_config(config_file)
    url = api_url or os.environ.get(ENV_URL) or file.get("api_url") or DEFAULT_URL
    key = api_key or os.environ.get(ENV_KEY) or file.get("api_key")
    return Settings(api_url=url.rstrip("/"), api_key=key or None)
