"""facility client certificate lifecycle: delivery, notifications, dental code, contact

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 06:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("facility", schema=None) as batch_op:
        batch_op.add_column(sa.Column("dental_code", sa.String(length=10), nullable=True))
        batch_op.add_column(sa.Column("contact_email", sa.String(length=320), nullable=True))
        batch_op.create_unique_constraint(batch_op.f("uq_facility_dental_code"), ["dental_code"])

    op.create_table(
        "certificate_delivery",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("certificate_id", sa.Integer(), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("p12_wrapped", sa.LargeBinary(), nullable=True),
        sa.Column("file_name", sa.String(length=200), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("window_started_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("failed_attempts", sa.Integer(), nullable=False),
        sa.Column("locked_at", sa.DateTime(), nullable=True),
        sa.Column("downloaded_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["certificate_id"],
            ["client_certificate.id"],
            name=op.f("fk_certificate_delivery_certificate_id_client_certificate"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_certificate_delivery")),
        sa.UniqueConstraint("certificate_id", name=op.f("uq_certificate_delivery_certificate_id")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_certificate_delivery_token_hash")),
    )
    op.create_table(
        "notification",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=True),
        sa.Column("certificate_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("due_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("recipient", sa.String(length=320), nullable=True),
        sa.Column("subject", sa.String(length=300), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("smtp_claimed_at", sa.DateTime(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(
            ["certificate_id"],
            ["client_certificate.id"],
            name=op.f("fk_notification_certificate_id_client_certificate"),
        ),
        sa.ForeignKeyConstraint(
            ["facility_id"], ["facility.id"], name=op.f("fk_notification_facility_id_facility")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notification")),
        sa.UniqueConstraint("certificate_id", "kind", name=op.f("uq_notification_certificate_id")),
    )
    with op.batch_alter_table("notification", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_notification_facility_id"), ["facility_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("notification", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_notification_facility_id"))
    op.drop_table("notification")
    op.drop_table("certificate_delivery")
    with op.batch_alter_table("facility", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("uq_facility_dental_code"), type_="unique")
        batch_op.drop_column("contact_email")
        batch_op.drop_column("dental_code")
