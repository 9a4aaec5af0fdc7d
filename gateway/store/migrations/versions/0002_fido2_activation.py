"""FIDO2 enrolment, WebAuthn challenges, SAD and its hash multiset

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "enrollment",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("signer_id", sa.String(length=40), nullable=False),
        sa.Column("code_hash", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=200), nullable=False),
        sa.Column("failed_tries", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["signer_id"], ["signer.id"], name=op.f("fk_enrollment_signer_id_signer")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollment")),
        sa.UniqueConstraint("code_hash", name=op.f("uq_enrollment_code_hash")),
    )
    op.create_index(op.f("ix_enrollment_signer_id"), "enrollment", ["signer_id"])
    op.create_table(
        "fido_credential",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("signer_id", sa.String(length=40), nullable=False),
        sa.Column("credential_id", sa.String(length=1400), nullable=False),
        sa.Column("credential_data", sa.LargeBinary(), nullable=False),
        sa.Column("sign_count", sa.BigInteger(), nullable=False),
        sa.Column("aaguid", sa.String(length=36), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("last_used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["signer_id"], ["signer.id"], name=op.f("fk_fido_credential_signer_id_signer")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fido_credential")),
        sa.UniqueConstraint("credential_id", name=op.f("uq_fido_credential_credential_id")),
    )
    op.create_index(op.f("ix_fido_credential_signer_id"), "fido_credential", ["signer_id"])
    op.create_table(
        "webauthn_challenge",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("signer_id", sa.String(length=40), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=True),
        sa.Column("enrollment_id", sa.Integer(), nullable=True),
        sa.Column("credential_id", sa.String(length=40), nullable=True),
        sa.Column("binding", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.Column("used_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["enrollment_id"],
            ["enrollment.id"],
            name=op.f("fk_webauthn_challenge_enrollment_id_enrollment"),
        ),
        sa.ForeignKeyConstraint(
            ["facility_id"],
            ["facility.id"],
            name=op.f("fk_webauthn_challenge_facility_id_facility"),
        ),
        sa.ForeignKeyConstraint(
            ["signer_id"], ["signer.id"], name=op.f("fk_webauthn_challenge_signer_id_signer")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webauthn_challenge")),
    )
    op.create_index(op.f("ix_webauthn_challenge_expires_at"), "webauthn_challenge", ["expires_at"])
    op.create_table(
        "sad",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=False),
        sa.Column("signer_id", sa.String(length=40), nullable=False),
        sa.Column("credential_id", sa.String(length=40), nullable=False),
        sa.Column("fido_credential_id", sa.String(length=40), nullable=True),
        sa.Column("hash_algorithm", sa.String(length=40), nullable=True),
        sa.Column("scal", sa.String(length=1), nullable=False),
        sa.Column("num_signatures", sa.Integer(), nullable=False),
        sa.Column("remaining", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("expires_at", sa.DateTime(), nullable=False),
        sa.CheckConstraint("remaining >= 0", name=op.f("ck_sad_remaining_not_negative")),
        sa.ForeignKeyConstraint(
            ["credential_id"], ["credential.id"], name=op.f("fk_sad_credential_id_credential")
        ),
        sa.ForeignKeyConstraint(
            ["facility_id"], ["facility.id"], name=op.f("fk_sad_facility_id_facility")
        ),
        sa.ForeignKeyConstraint(["signer_id"], ["signer.id"], name=op.f("fk_sad_signer_id_signer")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_sad")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_sad_token_hash")),
    )
    op.create_index(op.f("ix_sad_expires_at"), "sad", ["expires_at"])
    op.create_table(
        "sad_hash",
        sa.Column("sad_id", sa.Integer(), nullable=False),
        sa.Column("hash", sa.LargeBinary(length=64), nullable=False),
        sa.Column("authorized", sa.Integer(), nullable=False),
        sa.Column("remaining", sa.Integer(), nullable=False),
        sa.CheckConstraint("remaining >= 0", name=op.f("ck_sad_hash_remaining_not_negative")),
        sa.ForeignKeyConstraint(
            ["sad_id"], ["sad.id"], name=op.f("fk_sad_hash_sad_id_sad"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("sad_id", "hash", name=op.f("pk_sad_hash")),
    )


def downgrade() -> None:
    op.drop_table("sad_hash")
    op.drop_index(op.f("ix_sad_expires_at"), table_name="sad")
    op.drop_table("sad")
    op.drop_index(op.f("ix_webauthn_challenge_expires_at"), table_name="webauthn_challenge")
    op.drop_table("webauthn_challenge")
    op.drop_index(op.f("ix_fido_credential_signer_id"), table_name="fido_credential")
    op.drop_table("fido_credential")
    op.drop_index(op.f("ix_enrollment_signer_id"), table_name="enrollment")
    op.drop_table("enrollment")
