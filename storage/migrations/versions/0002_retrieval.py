"""retrieval: studies the node asked a source for (cradle retrieve), the history marker

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('retrieval',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('source', sa.String(length=64), nullable=False),
    sa.Column('method', sa.String(length=8), nullable=False),
    sa.Column('run_pipelines', sa.Boolean(), nullable=False),
    sa.Column('state', sa.Enum('retrieving', 'retrieved', 'failed', name='retrievalstate', native_enum=False, length=16), nullable=False),
    sa.Column('expected_instances', sa.Integer(), nullable=True),
    sa.Column('archived_instances', sa.Integer(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('requested_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('retrieval', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_retrieval_study_uid'), ['study_uid'], unique=False)
        batch_op.create_index(batch_op.f('ix_retrieval_state'), ['state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('retrieval', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_retrieval_state'))
        batch_op.drop_index(batch_op.f('ix_retrieval_study_uid'))

    op.drop_table('retrieval')
