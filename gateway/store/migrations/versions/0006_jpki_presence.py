"""My Number card (JPKI) presence: linked authentication certificates and card challenges

Revision ID: 0006_jpki
Revises: 0005_selfservice
Create Date: 2026-11-27 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_jpki"
down_revision = "0005_selfservice"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jpki_binding",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("signer_id", sa.String(length=40), nullable=False),
        sa.Column("spki_sha256", sa.String(length=64), nullable=False),
        sa.Column("issuer", sa.String(length=500), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("certificate_der", sa.LargeBinary(), nullable=False),
        sa.Column("not_after", sa.DateTime(), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["signer_id"], ["signer.id"], name=op.f("fk_jpki_binding_signer_id_signer")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jpki_binding")),
        sa.UniqueConstraint("spki_sha256", name=op.f("uq_jpki_binding_spki_sha256")),
    )
    op.create_index(op.f("ix_jpki_binding_signer_id"), "jpki_binding", ["signer_id"])
    op.create_table(
        "jpki_challenge",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("challenge", sa.LargeBinary(length=64), nullable=False),
        sa.Column("signer_id", sa.String(length=40), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=True),
        sa.Column("enrollment_id", sa.Integer(), nullable=True),
        sa.Column("credential_id", sa.String(length=40), nullable=True),
        sa.Column("binding", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["signer_id"], ["signer.id"], name=op.f("fk_jpki_challenge_signer_id_signer")
        ),
        sa.ForeignKeyConstraint(
            ["facility_id"], ["facility.id"], name=op.f("fk_jpki_challenge_facility_id_facility")
        ),
        sa.ForeignKeyConstraint(
            ["enrollment_id"],
            ["enrollment.id"],
            name=op.f("fk_jpki_challenge_enrollment_id_enrollment"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jpki_challenge")),
    )
    op.create_index(op.f("ix_jpki_challenge_expires_at"), "jpki_challenge", ["expires_at"])


def downgrade() -> None:
    op.drop_index(op.f("ix_jpki_challenge_expires_at"), table_name="jpki_challenge")
    op.drop_table("jpki_challenge")
    op.drop_index(op.f("ix_jpki_binding_signer_id"), table_name="jpki_binding")
    op.drop_table("jpki_binding")
