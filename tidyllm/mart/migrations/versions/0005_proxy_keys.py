"""Proxy keys: API keys of the tidyllm LiteLLM proxy, each bound to a user and a department.

Why: a proxy must govern a caller as the identity its key was issued to, not as whatever the request's
metadata claims; keys are kept as SHA-256 digests so the mart never holds a usable key.

Revision ID: 0005
Revises: 0004
"""

from alembic import op
import sqlalchemy as sa

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('proxy_keys',
    sa.Column('id', sa.String(length=36), nullable=False, comment='UUID of the key: what `tidyllm keys revoke` and `rotate` take'),
    sa.Column('key_hash', sa.String(length=64), nullable=False, comment='SHA-256 of the key; the key itself is shown once at creation and never stored'),
    sa.Column('prefix', sa.String(length=24), nullable=False, comment='first characters of the key, to recognise it in listings'),
    sa.Column('user_id', sa.String(length=200), nullable=True, comment="user the key speaks for; NULL for an application key (the request's OpenAI `user` field names the end user)"),
    sa.Column('department', sa.String(length=200), nullable=False, comment='department every call with the key is governed as'),
    sa.Column('routes', sa.JSON(none_as_null=True), nullable=True, comment='glob patterns of the routes and groups the key may call; NULL: any the authorisation policy allows'),
    sa.Column('note', sa.String(length=300), nullable=True, comment='free text: what the key is for'),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False, comment='UTC creation time'),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=True, comment='UTC time the key stops working (NULL: never)'),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True, comment='UTC time the key was revoked or rotated (NULL: live)'),
    sa.Column('replaced_by', sa.String(length=36), nullable=True, comment='proxy_keys.id of the key that replaced it by rotation'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash'),
    comment='API keys of the tidyllm LiteLLM proxy, each bound to a user and department (stored hashed).'
    )


def downgrade() -> None:
    op.drop_table('proxy_keys')
