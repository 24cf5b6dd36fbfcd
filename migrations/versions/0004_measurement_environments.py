"""environments (fingerprints of the stacks measurements ran on) and measurements.environment_id

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-25 13:00:00
"""
from alembic import op
import sqlalchemy as sa
import app.dbmodels
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('environments',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('fingerprint', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', app.dbmodels.UTCDateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_environments'))
    )
    # Existing rows keep environment_id NULL: they were measured before environments were recorded.
    with op.batch_alter_table('measurements', schema=None) as batch_op:
        batch_op.add_column(sa.Column('environment_id', sa.String(length=64), nullable=True))
        batch_op.create_index(batch_op.f('ix_measurements_environment_id'), ['environment_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_measurements_environment_id_environments'), 'environments',
                                    ['environment_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('measurements', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_measurements_environment_id_environments'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_measurements_environment_id'))
        batch_op.drop_column('environment_id')

    op.drop_table('environments')
