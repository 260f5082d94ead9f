"""escalations: a return escalated to Customer Care by an automation, once per return

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 00:50:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

import models.tables

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('escalations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('return_id', sa.Integer(), nullable=False),
    sa.Column('rma', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('cause', sqlmodel.sql.sqltypes.AutoString(length=40), nullable=False),
    sa.Column('source', sqlmodel.sql.sqltypes.AutoString(length=80), nullable=True),
    sa.Column('escalated_at', models.tables.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['return_id'], ['returns.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('return_id')
    )


def downgrade() -> None:
    op.drop_table('escalations')
