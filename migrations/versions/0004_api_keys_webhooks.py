"""storefront API keys, verified API requests, webhook endpoints

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import models.tables

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('key_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('created_at', models.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', models.tables.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name'),
    sa.UniqueConstraint('key_hash')
    )
    op.create_table('api_requests',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('reference', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('api_key_id', sa.Integer(), nullable=True),
    sa.Column('idempotency_key', sqlmodel.sql.sqltypes.AutoString(length=128), nullable=False),
    sa.Column('body_hash', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('order_number', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('flow_run_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('response', sa.JSON(), nullable=True),
    sa.Column('created_at', models.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['api_key_id'], ['api_keys.id'], ),
    sa.ForeignKeyConstraint(['order_number'], ['orders.number'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('api_key_id', 'idempotency_key'),
    sa.UniqueConstraint('reference')
    )
    with op.batch_alter_table('api_requests', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_requests_api_key_id'), ['api_key_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_api_requests_order_number'), ['order_number'], unique=False)

    op.create_table('webhook_endpoints',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('url', sqlmodel.sql.sqltypes.AutoString(length=254), nullable=False),
    sa.Column('secret', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
    sa.Column('created_at', models.tables.UTCDateTime(timezone=True), nullable=False),
    sa.Column('disabled_at', models.tables.UTCDateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('webhook_endpoints')
    with op.batch_alter_table('api_requests', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_requests_order_number'))
        batch_op.drop_index(batch_op.f('ix_api_requests_api_key_id'))
    op.drop_table('api_requests')
    op.drop_table('api_keys')
