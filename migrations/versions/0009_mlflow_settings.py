"""issue 21: each tenant's MLflow tracking server (jobs log to it, models are pulled from it)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 22:00:00.000000
"""
from alembic import op
import sqlalchemy as sa
import app.dbmodels

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('mlflow_settings',
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('tracking_uri', sa.String(length=2048), nullable=False),
    sa.Column('username', sa.String(length=255), nullable=True),
    sa.Column('credential_kind', sa.String(length=16), nullable=True),
    sa.Column('credential_encrypted', sa.Text(), nullable=True),
    sa.Column('registered_model_prefix', sa.String(length=255), server_default='', nullable=False),
    sa.Column('created_at', app.dbmodels.UTCDateTime(timezone=True), nullable=False),
    sa.Column('updated_at', app.dbmodels.UTCDateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_mlflow_settings_tenant_id_tenants'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', name=op.f('pk_mlflow_settings'))
    )


def downgrade() -> None:
    op.drop_table('mlflow_settings')
