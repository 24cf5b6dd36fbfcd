"""the other models a job uses (a distillation student)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 11:50:00
"""
from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('job_models',
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('role', sa.String(length=64), nullable=False),
    sa.Column('model_id', sa.String(length=36), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_models_job_id_jobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], name=op.f('fk_job_models_model_id_models'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'role', name=op.f('pk_job_models'))
    )
    with op.batch_alter_table('job_models', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_models_model_id'), ['model_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_models_model_id'))
    op.drop_table('job_models')
