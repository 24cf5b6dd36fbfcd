"""issue 9: job heartbeats and owners, key scopes and expiry, tenant limits, audit log

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25 13:38:14.163939
"""
from alembic import op
import sqlalchemy as sa
import app.dbmodels
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_log',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('tenant_id', sa.String(length=36), nullable=True),
    sa.Column('key_id', sa.String(length=36), nullable=True),
    sa.Column('action', sa.String(length=64), nullable=False),
    sa.Column('object_type', sa.String(length=32), nullable=True),
    sa.Column('object_id', sa.String(length=64), nullable=True),
    sa.Column('detail', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('client_ip', sa.String(length=64), nullable=True),
    sa.Column('created_at', app.dbmodels.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_audit_log_tenant_id_tenants'), ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_audit_log'))
    )
    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.create_index('ix_audit_log_tenant_created', ['tenant_id', 'created_at', 'id'], unique=False)

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        # Keys made before scopes existed keep what they could do: read and write.
        batch_op.add_column(sa.Column('scopes', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False, server_default=sa.text("'[\"read\", \"write\"]'")))
        batch_op.add_column(sa.Column('expires_at', app.dbmodels.UTCDateTime(timezone=True), nullable=True))

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_at', app.dbmodels.UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('worker_id', sa.String(length=255), nullable=True))

    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_concurrent_jobs', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('max_stored_bytes', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('requests_per_minute', sa.Integer(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('requests_per_minute')
        batch_op.drop_column('max_stored_bytes')
        batch_op.drop_column('max_concurrent_jobs')

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('worker_id')
        batch_op.drop_column('heartbeat_at')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_column('expires_at')
        batch_op.drop_column('scopes')

    with op.batch_alter_table('audit_log', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_log_tenant_created')

    op.drop_table('audit_log')
