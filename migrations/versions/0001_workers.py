"""workers and their heartbeat samples

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Constraint and index names follow app.db.NAMING_CONVENTION.
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("url", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("device", sa.String(), nullable=False),
        sa.Column("policy", sa.String(), nullable=False),
        sa.Column("slo_ttft_ms", sa.Float(), nullable=False),
        sa.Column("slo_tpot_ms", sa.Float(), nullable=False),
        sa.Column("hostname", sa.String(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_heartbeat", sa.DateTime(timezone=True), nullable=False),
        sa.Column("max_model_len", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_workers"),
    )
    op.create_index("ix_workers_model", "workers", ["model"])
    op.create_index("ix_workers_status", "workers", ["status"])

    op.create_table(
        "worker_samples",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("worker_id", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kv_usage", sa.Float(), nullable=False),
        sa.Column("checkpoint_usage", sa.Float(), nullable=False),
        sa.Column("running_online", sa.Integer(), nullable=False),
        sa.Column("running_offline", sa.Integer(), nullable=False),
        sa.Column("waiting_online", sa.Integer(), nullable=False),
        sa.Column("waiting_offline", sa.Integer(), nullable=False),
        sa.Column("busy_fraction", sa.Float(), nullable=False),
        sa.Column("gpu_utilization", sa.Float(), nullable=True),
        sa.Column("ttft_p50", sa.Float(), nullable=True),
        sa.Column("ttft_p99", sa.Float(), nullable=True),
        sa.Column("tpot_p50", sa.Float(), nullable=True),
        sa.Column("tpot_p99", sa.Float(), nullable=True),
        sa.Column("online_tokens_per_s", sa.Float(), nullable=False),
        sa.Column("offline_tokens_per_s", sa.Float(), nullable=False),
        sa.Column("preemptions", sa.Integer(), nullable=False),
        sa.Column("layer_yields", sa.Integer(), nullable=False),
        sa.Column("checkpointed_tokens", sa.Integer(), nullable=False),
        sa.Column("restored_tokens", sa.Integer(), nullable=False),
        sa.Column("recomputed_tokens", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["worker_id"], ["workers.id"], name="fk_worker_samples_worker_id_workers", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_worker_samples"),
    )
    op.create_index("ix_worker_samples_at", "worker_samples", ["at"])
    op.create_index("ix_worker_samples_worker_id_at", "worker_samples", ["worker_id", "at"])


def downgrade() -> None:
    op.drop_table("worker_samples")  # its indexes go with it
    op.drop_table("workers")
