"""payment providers' webhook events, one row per event id

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 23:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import models.tables

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('provider_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('provider', sqlmodel.sql.sqltypes.AutoString(length=20), nullable=False),
    sa.Column('event_id', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
    sa.Column('type', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=False),
    sa.Column('provider_ref', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True),
    sa.Column('rma', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=True),
    sa.Column('received_at', models.tables.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('provider', 'event_id')
    )


def downgrade() -> None:
    op.drop_table('provider_events')
