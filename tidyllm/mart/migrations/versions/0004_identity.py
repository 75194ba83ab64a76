"""Identity: department and user budget names normalised (case, whitespace), no schema change.

Why: calls are matched to budgets by normalised names from this revision on
(tidyllm.governance.identity.normalize_name), so a budget created as "Risk " must become "risk"
or it would stop applying to the department's calls. Two budgets that normalise to the same
scope, name and period cannot be merged automatically (which limit holds?): the upgrade stops,
names both, and changes nothing.

Revision ID: 0004
Revises: 0003
"""

from alembic import op
import sqlalchemy as sa

from tidyllm.errors import StorageError
from tidyllm.governance.names import normalize_name

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_budgets = sa.table("budgets", sa.column("id", sa.String), sa.column("scope", sa.String),
                    sa.column("name", sa.String), sa.column("period", sa.String))


def upgrade() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.select(_budgets.c.id, _budgets.c.scope, _budgets.c.name, _budgets.c.period)).all()
    taken = {(scope, name, period): budget_id for budget_id, scope, name, period in rows}
    changes = []
    for budget_id, scope, name, period in rows:
        if scope not in ("department", "user"):
            continue
        canonical = normalize_name(name)
        if canonical == name:
            continue
        other = taken.get((scope, canonical, period))
        if other is not None and other != budget_id:
            raise StorageError(
                f"the {period} {scope} budgets {name!r} and {canonical!r} are the same {scope} once names are "
                f"compared without case and extra spaces: delete one (`platform.budgets.delete({scope!r}, "
                f"{name!r}, {period!r})` with the previous tidyllm) and upgrade again")
        taken[(scope, canonical, period)] = budget_id
        changes.append((budget_id, canonical))
    for budget_id, canonical in changes:
        conn.execute(_budgets.update().where(_budgets.c.id == budget_id).values(name=canonical))


def downgrade() -> None:
    # the original spellings are not kept: normalised names work with older code too
    pass
