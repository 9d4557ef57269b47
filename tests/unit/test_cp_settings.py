"""CPSettings: env names, defaults, URL normalisation, the JWT secret (length, file), the data
directory's mode, atomic secret files, redaction."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from nestbox.controlplane.settings import (
    CPSettings,
    jwt_secret,
    prepare_data_dir,
    split_listen,
    write_private,
)


def test_defaults_and_env_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("NESTBOX_DATABASE_URL", "NESTBOX_PROXY_DOMAIN", "NESTBOX_CP_LISTEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NESTBOX_DIR", str(tmp_path))
    monkeypatch.setenv("NESTBOX_CP_RECONCILE_INTERVAL_S", "5")
    s = CPSettings()
    assert s.data_dir == tmp_path
    assert s.db_url == f"sqlite+aiosqlite:///{tmp_path / 'cp.db'}"
    assert s.listen == "127.0.0.1:9725"
    assert s.base_url == "http://127.0.0.1:9725"
    assert s.proxy_domain == "localhost:9725"
    assert s.reconcile_interval_s == 5
    assert s.heartbeat_unreachable_after_s == 75
    assert s.host_monitor_interval_s == 10
    monkeypatch.setenv("NESTBOX_DATABASE_URL", "postgresql://u:p@h:5432/d")
    monkeypatch.setenv("NESTBOX_PROXY_DOMAIN", "nest.example:443")
    s = CPSettings()
    assert s.db_url == "postgresql+asyncpg://u:p@h:5432/d"
    assert s.proxy_domain == "nest.example:443"


@pytest.mark.parametrize(
    ("given", "effective"),
    [
        ("postgres://h/d", "postgresql+asyncpg://h/d"),
        ("postgresql+asyncpg://h/d", "postgresql+asyncpg://h/d"),
        ("sqlite:////x/cp.db", "sqlite+aiosqlite:////x/cp.db"),
    ],
)
def test_database_urls_get_async_drivers(given: str, effective: str) -> None:
    assert CPSettings(database_url=given).db_url == effective


def test_listen() -> None:
    assert split_listen("[::1]:9725") == ("::1", 9725)
    assert CPSettings(listen="[::1]:80").base_url == "http://[::1]:80"
    assert CPSettings(listen="0.0.0.0:8000").base_url == "http://127.0.0.1:8000"
    with pytest.raises(ValidationError):
        CPSettings(listen="9725")


def test_jwt_secret_is_made_once_and_private(tmp_path: Path) -> None:
    s = CPSettings(data_dir=tmp_path / "d")
    first = jwt_secret(s)
    assert len(first) == 64
    assert jwt_secret(s) == first
    assert stat.S_IMODE((tmp_path / "d" / "jwt-secret").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["jwt-secret"]  # no temp file left
    given = "g" * 32
    assert jwt_secret(CPSettings(data_dir=tmp_path / "d", jwt_secret=SecretStr(given))) == b"g" * 32


@pytest.mark.parametrize("short", ["", "x", "x" * 31, "é" * 15])
def test_short_jwt_secret_is_refused(monkeypatch: pytest.MonkeyPatch, short: str) -> None:
    monkeypatch.setenv("NESTBOX_CP_JWT_SECRET", short)
    with pytest.raises(ValidationError, match="at least 32 bytes"):
        CPSettings()
    monkeypatch.setenv("NESTBOX_CP_JWT_SECRET", "é" * 16)  # 32 bytes, 16 characters
    assert CPSettings().jwt_secret is not None


def test_empty_secret_file_is_regenerated_short_one_refused(tmp_path: Path) -> None:
    """An empty file (an older version's crash mid-write) gets a new secret; a short one an
    operator put there is an error, never silently replaced."""
    s = CPSettings(data_dir=tmp_path)
    (tmp_path / "jwt-secret").write_text("")
    made = jwt_secret(s)
    assert len(made) == 64
    assert (tmp_path / "jwt-secret").read_text().strip().encode() == made
    assert stat.S_IMODE((tmp_path / "jwt-secret").stat().st_mode) == 0o600
    (tmp_path / "jwt-secret").write_text("short\n")
    with pytest.raises(ValueError, match="fewer than 32 bytes"):
        jwt_secret(s)


def test_data_dir_is_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    prepare_data_dir(loose)
    assert stat.S_IMODE(loose.stat().st_mode) == 0o700
    assert "set it to 700" in caplog.text
    made = tmp_path / "new" / "dir"
    prepare_data_dir(made)
    assert stat.S_IMODE(made.stat().st_mode) == 0o700


def test_write_private_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails halfway leaves the old file whole and no temp file behind."""
    target = tmp_path / "admin-api-key"
    write_private(target, "old\n")

    def broken_fsync(fd: int) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        write_private(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["admin-api-key"]
    write_private(target, "newer\n", exclusive=True)  # exclusive: an existing file wins
    assert target.read_text() == "old\n"
    write_private(target, "newest\n")
    assert target.read_text() == "newest\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_redacted() -> None:
    s = CPSettings(database_url="postgresql://u:pw@h/d", jwt_secret=SecretStr("s3cret" * 6))
    doc = s.redacted()
    assert "pw" not in doc["database_url"]
    assert doc["jwt_secret"] != "s3cret" * 6
