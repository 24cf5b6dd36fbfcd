"""datasets and the datasets a job uses

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 09:29:17.999689
"""
from alembic import op
import sqlalchemy as sa
import app.dbmodels
from sqlalchemy.dialects import postgresql

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('datasets',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('format', sa.String(length=16), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('inspection', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('created_at', app.dbmodels.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['sha256'], ['blobs.sha256'], name=op.f('fk_datasets_sha256_blobs')),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_datasets_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_datasets'))
    )
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_datasets_sha256'), ['sha256'], unique=False)
        batch_op.create_index('ix_datasets_tenant_created', ['tenant_id', 'created_at', 'id'], unique=False)

    op.create_table('job_datasets',
    sa.Column('job_id', sa.String(length=36), nullable=False),
    sa.Column('role', sa.String(length=64), nullable=False),
    sa.Column('dataset_id', sa.String(length=36), nullable=False),
    sa.ForeignKeyConstraint(['dataset_id'], ['datasets.id'], name=op.f('fk_job_datasets_dataset_id_datasets'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_job_datasets_job_id_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('job_id', 'role', name=op.f('pk_job_datasets'))
    )
    with op.batch_alter_table('job_datasets', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_job_datasets_dataset_id'), ['dataset_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job_datasets', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_job_datasets_dataset_id'))

    op.drop_table('job_datasets')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_index('ix_datasets_tenant_created')
        batch_op.drop_index(batch_op.f('ix_datasets_sha256'))

    op.drop_table('datasets')
