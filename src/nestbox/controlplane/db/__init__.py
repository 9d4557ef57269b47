"""The control plane's persistence: typed SQLAlchemy rows, one repository per aggregate, Alembic
migrations. Rows never leave this package; repositories hand out frozen records."""

from nestbox.controlplane.db.session import Database
from nestbox.controlplane.db.tx import Tx

__all__ = ["Database", "Tx"]
