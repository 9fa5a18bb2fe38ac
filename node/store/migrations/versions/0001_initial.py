"""The schema as Base.metadata.create_all made it before migrations (all tables, pseudonyms included).

A database made by create_all (tables there, no alembic_version) is adopted by this revision: only the
tables it lacks are created (create_all made a table only once its model had been imported, so an old
store may lack, say, pseudonyms), and the existing ones with their rows are kept as they are.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    if 'commitments' not in existing:
        op.create_table('commitments',
        sa.Column('transaction_uid', sa.String(length=64), nullable=False),
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('dispatch_ids', sa.JSON(), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('requested_at', sa.Float(), nullable=False),
        sa.Column('next_check_at', sa.Float(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('expired_at', sa.Float(), nullable=True),
        sa.Column('reported_at', sa.Float(), nullable=True),
        sa.Column('reported_by', sa.String(length=64), nullable=True),
        sa.Column('committed', sa.JSON(), nullable=True),
        sa.Column('failed', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('transaction_uid')
        )
        with op.batch_alter_table('commitments', schema=None) as batch_op:
            batch_op.create_index('ix_commitments_state', ['state', 'next_check_at'], unique=False)
    
    if 'model_versions' not in existing:
        op.create_table('model_versions',
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('version', sa.String(length=32), nullable=False),
        sa.Column('digest', sa.String(length=64), nullable=False),
        sa.Column('first_used_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('name', 'version')
        )
    if 'pseudonyms' not in existing:
        op.create_table('pseudonyms',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('kind', sa.String(length=48), nullable=False),
        sa.Column('original', sa.String(length=256), nullable=False),
        sa.Column('pseudonym', sa.String(length=256), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('key_id', sa.String(length=16), nullable=False),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('pseudonyms', schema=None) as batch_op:
            batch_op.create_index('ix_pseudonym_lookup', ['kind', 'pseudonym'], unique=False)
            batch_op.create_index(batch_op.f('ix_pseudonyms_study_uid'), ['study_uid'], unique=False)
            batch_op.create_index('uq_pseudonym_pair', ['kind', 'study_uid', 'original', 'pseudonym'], unique=True)
    
    if 'requests' not in existing:
        op.create_table('requests',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('action', sa.String(length=32), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('study_uid', sa.String(length=64), nullable=True),
        sa.Column('requested_by', sa.String(length=64), nullable=True),
        sa.Column('requested_at', sa.Float(), nullable=False),
        sa.Column('handled_at', sa.Float(), nullable=True),
        sa.Column('outcome', sa.JSON(), nullable=True),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('requests', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_requests_handled_at'), ['handled_at'], unique=False)
    
    if 'studies' not in existing:
        op.create_table('studies',
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('patient_id', sa.String(length=64), nullable=True),
        sa.Column('accession_number', sa.String(length=16), nullable=True),
        sa.Column('study_description', sa.String(length=64), nullable=True),
        sa.Column('calling_ae', sa.String(length=16), nullable=True),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('instance_count', sa.Integer(), nullable=False),
        sa.Column('revision', sa.Integer(), nullable=False),
        sa.Column('first_received_at', sa.Float(), nullable=False),
        sa.Column('last_received_at', sa.Float(), nullable=False),
        sa.Column('completed_at', sa.Float(), nullable=True),
        sa.Column('completion_reason', sa.String(length=32), nullable=True),
        sa.Column('routed_at', sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint('study_uid')
        )
        with op.batch_alter_table('studies', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_studies_state'), ['state'], unique=False)
    
    if 'jobs' not in existing:
        op.create_table('jobs',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('rule', sa.String(length=64), nullable=False),
        sa.Column('plugin', sa.String(length=64), nullable=False),
        sa.Column('plugin_version', sa.String(length=32), nullable=True),
        sa.Column('priority', sa.Integer(), nullable=False),
        sa.Column('series_uids', sa.JSON(), nullable=False),
        sa.Column('destinations', sa.JSON(), nullable=False),
        sa.Column('state', sa.String(length=32), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('error', sa.Text(), nullable=True),
        sa.Column('summary', sa.Text(), nullable=True),
        sa.Column('timings', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.Float(), nullable=False),
        sa.Column('started_at', sa.Float(), nullable=True),
        sa.Column('finished_at', sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('jobs', schema=None) as batch_op:
            batch_op.create_index('ix_jobs_claim', ['state', 'priority', 'id'], unique=False)
            batch_op.create_index(batch_op.f('ix_jobs_study_uid'), ['study_uid'], unique=False)
    
    if 'series' not in existing:
        op.create_table('series',
        sa.Column('series_uid', sa.String(length=64), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('modality', sa.String(length=16), nullable=True),
        sa.Column('body_part', sa.String(length=64), nullable=True),
        sa.Column('description', sa.String(length=64), nullable=True),
        sa.Column('slice_thickness', sa.Float(), nullable=True),
        sa.Column('instance_count', sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(['study_uid'], ['studies.study_uid'], ),
        sa.PrimaryKeyConstraint('series_uid')
        )
        with op.batch_alter_table('series', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_series_study_uid'), ['study_uid'], unique=False)
    
    if 'dispatches' not in existing:
        op.create_table('dispatches',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('destination', sa.String(length=64), nullable=False),
        sa.Column('kind', sa.String(length=8), nullable=False),
        sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_attempt_at', sa.Float(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('sent_at', sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('dispatches', schema=None) as batch_op:
            batch_op.create_index('ix_dispatch_due', ['state', 'next_attempt_at'], unique=False)
            batch_op.create_index(batch_op.f('ix_dispatches_job_id'), ['job_id'], unique=False)
    
    if 'finding_feedback' not in existing:
        op.create_table('finding_feedback',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('finding_number', sa.Integer(), nullable=False),
        sa.Column('verdict', sa.String(length=16), nullable=False),
        sa.Column('value', sa.Float(), nullable=True),
        sa.Column('reviewer', sa.String(length=64), nullable=True),
        sa.Column('recorded_at', sa.Float(), nullable=False),
        sa.Column('audited_at', sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('id')
        )
        with op.batch_alter_table('finding_feedback', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_finding_feedback_audited_at'), ['audited_at'], unique=False)
            batch_op.create_index(batch_op.f('ix_finding_feedback_job_id'), ['job_id'], unique=False)
    
    if 'findings' not in existing:
        op.create_table('findings',
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('tracking_id', sa.String(length=64), nullable=False),
        sa.Column('finding_type', sa.String(length=64), nullable=False),
        sa.Column('confidence', sa.Float(), nullable=True),
        sa.Column('measurements', sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('job_id', 'number')
        )
    if 'instances' not in existing:
        op.create_table('instances',
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('series_uid', sa.String(length=64), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
        sa.Column('transfer_syntax', sa.String(length=64), nullable=False),
        sa.Column('path', sa.Text(), nullable=False),
        sa.Column('size_bytes', sa.Integer(), nullable=False),
        sa.Column('calling_ae', sa.String(length=16), nullable=True),
        sa.Column('received_at', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['series_uid'], ['series.series_uid'], ),
        sa.PrimaryKeyConstraint('sop_instance_uid')
        )
        with op.batch_alter_table('instances', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_instances_series_uid'), ['series_uid'], unique=False)
            batch_op.create_index(batch_op.f('ix_instances_study_uid'), ['study_uid'], unique=False)
    
    if 'job_outputs' not in existing:
        op.create_table('job_outputs',
        sa.Column('job_id', sa.Integer(), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('rule', sa.String(length=64), nullable=False),
        sa.Column('plugin', sa.String(length=64), nullable=False),
        sa.Column('model', sa.String(length=100), nullable=False),
        sa.Column('scanner', sa.String(length=200), nullable=False),
        sa.Column('shadow', sa.Integer(), nullable=False),
        sa.Column('finding_count', sa.Integer(), nullable=False),
        sa.Column('recorded_at', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('job_id')
        )
        with op.batch_alter_table('job_outputs', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_job_outputs_model'), ['model'], unique=False)
            batch_op.create_index(batch_op.f('ix_job_outputs_study_uid'), ['study_uid'], unique=False)
    
    if 'shadow_agreements' not in existing:
        op.create_table('shadow_agreements',
        sa.Column('shadow_job_id', sa.Integer(), nullable=False),
        sa.Column('primary_job_id', sa.Integer(), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('shadow_model', sa.String(length=100), nullable=False),
        sa.Column('primary_model', sa.String(length=100), nullable=False),
        sa.Column('counts_equal', sa.Integer(), nullable=False),
        sa.Column('max_abs_diff', sa.Float(), nullable=True),
        sa.Column('max_rel_diff', sa.Float(), nullable=True),
        sa.Column('details', sa.JSON(), nullable=False),
        sa.Column('recorded_at', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['shadow_job_id'], ['jobs.id'], ),
        sa.PrimaryKeyConstraint('shadow_job_id')
        )
        with op.batch_alter_table('shadow_agreements', schema=None) as batch_op:
            batch_op.create_index(batch_op.f('ix_shadow_agreements_primary_job_id'), ['primary_job_id'], unique=False)
    


def downgrade() -> None:
    op.drop_index(op.f('ix_shadow_agreements_primary_job_id'), table_name='shadow_agreements')
    op.drop_table('shadow_agreements')
    op.drop_index(op.f('ix_job_outputs_study_uid'), table_name='job_outputs')
    op.drop_index(op.f('ix_job_outputs_model'), table_name='job_outputs')
    op.drop_table('job_outputs')
    op.drop_index(op.f('ix_instances_study_uid'), table_name='instances')
    op.drop_index(op.f('ix_instances_series_uid'), table_name='instances')
    op.drop_table('instances')
    op.drop_table('findings')
    op.drop_index(op.f('ix_finding_feedback_job_id'), table_name='finding_feedback')
    op.drop_index(op.f('ix_finding_feedback_audited_at'), table_name='finding_feedback')
    op.drop_table('finding_feedback')
    op.drop_index(op.f('ix_dispatches_job_id'), table_name='dispatches')
    op.drop_index('ix_dispatch_due', table_name='dispatches')
    op.drop_table('dispatches')
    op.drop_index(op.f('ix_series_study_uid'), table_name='series')
    op.drop_table('series')
    op.drop_index(op.f('ix_jobs_study_uid'), table_name='jobs')
    op.drop_index('ix_jobs_claim', table_name='jobs')
    op.drop_table('jobs')
    op.drop_index(op.f('ix_studies_state'), table_name='studies')
    op.drop_table('studies')
    op.drop_index(op.f('ix_requests_handled_at'), table_name='requests')
    op.drop_table('requests')
    op.drop_index('uq_pseudonym_pair', table_name='pseudonyms')
    op.drop_index(op.f('ix_pseudonyms_study_uid'), table_name='pseudonyms')
    op.drop_index('ix_pseudonym_lookup', table_name='pseudonyms')
    op.drop_table('pseudonyms')
    op.drop_table('model_versions')
    op.drop_index('ix_commitments_state', table_name='commitments')
    op.drop_table('commitments')
