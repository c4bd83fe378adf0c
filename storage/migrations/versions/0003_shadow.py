"""job.shadow: shadow runs of a candidate model version beside the clinical run (cradle models shadow)

Revision ID: 0003_shadow
Revises: 0002
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0003_shadow'
down_revision = '0002'
branch_labels = None
depends_on = None

# 0001 left the (series_pk, pipeline) unique constraint unnamed: PostgreSQL named it itself, SQLite
# reflects it without a name, so batch mode finds it through a naming convention.
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}
_OLD_SQLITE = "uq_job_series_pk_pipeline"
_OLD_POSTGRESQL = "job_series_pk_pipeline_key"
_NEW = "uq_job_series_pipeline_shadow"


def _old_name() -> str:
    return _OLD_POSTGRESQL if op.get_bind().dialect.name == "postgresql" else _OLD_SQLITE


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None, naming_convention=_SQLITE_NAMES) as batch_op:
        batch_op.add_column(sa.Column('shadow', sa.String(length=64), server_default='', nullable=False))
        batch_op.drop_constraint(_old_name(), type_='unique')
        batch_op.create_unique_constraint(_NEW, ['series_pk', 'pipeline', 'shadow'])


def downgrade() -> None:
    op.execute("DELETE FROM send WHERE job_pk IN (SELECT id FROM job WHERE shadow != '')")
    op.execute("DELETE FROM job WHERE shadow != ''")
    with op.batch_alter_table('job', schema=None, naming_convention=_SQLITE_NAMES) as batch_op:
        batch_op.drop_constraint(_NEW, type_='unique')
        batch_op.create_unique_constraint(_old_name(), ['series_pk', 'pipeline'])
        batch_op.drop_column('shadow')
