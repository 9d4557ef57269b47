"""`Services`: every service of the control plane, built once in the app's lifespan and reached
by handlers through `api/deps.services(request)`. Add a service here when you add one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from nestbox.controlplane.services.accounts import AccountService
from nestbox.controlplane.services.api_keys import ApiKeyService
from nestbox.controlplane.services.auth import AuthService
from nestbox.controlplane.services.teams import TeamService
from nestbox.controlplane.settings import jwt_secret

if TYPE_CHECKING:
    from nestbox.controlplane.db import Database
    from nestbox.controlplane.settings import CPSettings


@dataclass(frozen=True, slots=True)
class Services:
    settings: CPSettings
    db: Database
    auth: AuthService
    accounts: AccountService
    api_keys: ApiKeyService
    teams: TeamService


def build_services(settings: CPSettings, db: Database) -> Services:
    """:raise OSError: the JWT secret file cannot be read or made."""
    return Services(
        settings=settings,
        db=db,
        auth=AuthService(
            db,
            secret=jwt_secret(settings),
            session_ttl_s=settings.jwt_ttl_s,
            signup_enabled=settings.signup_enabled,
        ),
        accounts=AccountService(db),
        api_keys=ApiKeyService(db),
        teams=TeamService(db),
    )
