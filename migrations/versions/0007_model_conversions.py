"""issue 16: conversions (models converted to ONNX link to their upload; jobs have a kind)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 20:55:00.000000
"""
from alembic import op
import sqlalchemy as sa

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        # Jobs made before conversions existed are compression jobs.
        batch_op.add_column(sa.Column('kind', sa.String(length=16), nullable=False, server_default='compress'))

    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_model_id', sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f('ix_models_source_model_id'), ['source_model_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_models_source_model_id_models'), 'models', ['source_model_id'],
                                    ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_models_source_model_id_models'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_models_source_model_id'))
        batch_op.drop_column('source_model_id')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('kind')
