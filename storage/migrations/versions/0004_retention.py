"""retention: pruned_study (resumable prune, manifests told of pruned studies); indexes for a large archive

Revision ID: 0004
Revises: 0003_shadow
Create Date: 2026-12-03
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003_shadow'
branch_labels = None
depends_on = None

INDEXES = (
    ('job', 'finished_at'),       # status: job durations of the last 24 h
    ('send', 'sent_at'),          # status: sends of the last 24 h
    ('study', 'created_at'),      # retention: oldest first
    ('study_label', 'task'),      # training reads only the labelled subset
)


def upgrade() -> None:
    op.create_table('pruned_study',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_uid', sa.String(length=64), nullable=False),
    sa.Column('state', sa.Enum('pruning', 'pruned', name='prunestate', native_enum=False, length=16), nullable=False),
    sa.Column('instances', sa.Integer(), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('rule', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_uid')
    )
    with op.batch_alter_table('pruned_study', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_pruned_study_state'), ['state'], unique=False)
    for table, column in INDEXES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.create_index(batch_op.f(f'ix_{table}_{column}'), [column], unique=False)
    with op.batch_alter_table('instance', schema=None) as batch_op:
        # "received" (status): the last 24 h as a range, all time from the index alone
        batch_op.create_index('ix_instance_received', ['received_at', 'series_pk', 'file_size'], unique=False)
    with op.batch_alter_table('send', schema=None) as batch_op:  # sends by destination, from the index alone
        batch_op.create_index('ix_send_destination_status', ['destination', 'status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('send', schema=None) as batch_op:
        batch_op.drop_index('ix_send_destination_status')
    with op.batch_alter_table('instance', schema=None) as batch_op:
        batch_op.drop_index('ix_instance_received')
    for table, column in reversed(INDEXES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_index(batch_op.f(f'ix_{table}_{column}'))
    with op.batch_alter_table('pruned_study', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_pruned_study_state'))
    op.drop_table('pruned_study')
