"""facility self-service: applications, vendors, renewal key check, fee ledger

Revision ID: 0005_selfservice
Revises: 0004
Create Date: 2026-11-27 10:51:05.541822
"""

from __future__ import annotations

import hashlib

import sqlalchemy as sa
from alembic import op
from cryptography import x509
from cryptography.hazmat.primitives import serialization

revision = "0005_selfservice"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vendor",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("contact_email", sa.String(length=320), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vendor")),
        sa.UniqueConstraint("name", name=op.f("uq_vendor_name")),
    )
    op.create_table(
        "application",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=20), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=True),
        sa.Column("institution_code", sa.String(length=10), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("cause", sa.String(length=30), nullable=True),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("facility_name", sa.String(length=200), nullable=False),
        sa.Column("facility_kind", sa.String(length=20), nullable=False),
        sa.Column("provisional", sa.Boolean(), nullable=False),
        sa.Column("new_institution_code", sa.String(length=10), nullable=True),
        sa.Column("recipient_name", sa.String(length=200), nullable=True),
        sa.Column("contact_email", sa.String(length=320), nullable=True),
        sa.Column("terminals", sa.Text(), nullable=False),
        sa.Column("remarks", sa.Text(), nullable=True),
        sa.Column("applicant", sa.String(length=200), nullable=False),
        sa.Column("via", sa.String(length=10), nullable=False),
        sa.Column("vendor_id", sa.Integer(), nullable=True),
        sa.Column("supersedes", sa.String(length=20), nullable=True),
        sa.Column("superseded_by", sa.String(length=20), nullable=True),
        sa.Column("decided_by", sa.String(length=200), nullable=True),
        sa.Column("decision_reason", sa.String(length=500), nullable=True),
        sa.Column("certificates", sa.Text(), nullable=False),
        sa.Column("idempotency_scope", sa.String(length=200), nullable=True),
        sa.Column("idempotency_key", sa.String(length=100), nullable=True),
        sa.Column("body_sha256", sa.String(length=64), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["facility_id"], ["facility.id"], name=op.f("fk_application_facility_id_facility")
        ),
        sa.ForeignKeyConstraint(
            ["vendor_id"], ["vendor.id"], name=op.f("fk_application_vendor_id_vendor")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_application")),
        sa.UniqueConstraint(
            "idempotency_scope", "idempotency_key", name=op.f("uq_application_idempotency_scope")
        ),
        sa.UniqueConstraint("request_id", name=op.f("uq_application_request_id")),
    )
    with op.batch_alter_table("application", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_application_facility_id"), ["facility_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_application_institution_code"), ["institution_code"], unique=False
        )

    op.create_table(
        "fee_entry",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=False),
        sa.Column("institution_code", sa.String(length=10), nullable=False),
        sa.Column("kind", sa.String(length=20), nullable=False),
        sa.Column("amount_yen", sa.Integer(), nullable=False),
        sa.Column("occurred_at", sa.DateTime(), nullable=False),
        sa.Column("certificate_serial", sa.String(length=64), nullable=False),
        sa.Column("event", sa.String(length=40), nullable=False),
        sa.Column("description", sa.String(length=300), nullable=False),
        sa.ForeignKeyConstraint(
            ["facility_id"], ["facility.id"], name=op.f("fk_fee_entry_facility_id_facility")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_fee_entry")),
        sa.UniqueConstraint(
            "certificate_serial", "kind", name=op.f("uq_fee_entry_certificate_serial")
        ),
    )
    with op.batch_alter_table("fee_entry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_fee_entry_facility_id"), ["facility_id"], unique=False)

    op.create_table(
        "vendor_facility",
        sa.Column("vendor_id", sa.Integer(), nullable=False),
        sa.Column("facility_id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["facility_id"], ["facility.id"], name=op.f("fk_vendor_facility_facility_id_facility")
        ),
        sa.ForeignKeyConstraint(
            ["vendor_id"], ["vendor.id"], name=op.f("fk_vendor_facility_vendor_id_vendor")
        ),
        sa.PrimaryKeyConstraint("vendor_id", "facility_id", name=op.f("pk_vendor_facility")),
    )
    with op.batch_alter_table("client_certificate", schema=None) as batch_op:
        batch_op.add_column(sa.Column("vendor_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("spki_sha256", sa.String(length=64), nullable=True))
        batch_op.create_index(
            batch_op.f("ix_client_certificate_spki_sha256"), ["spki_sha256"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_client_certificate_vendor_id"), ["vendor_id"], unique=False
        )
        batch_op.create_foreign_key(
            batch_op.f("fk_client_certificate_vendor_id_vendor"), "vendor", ["vendor_id"], ["id"]
        )

    with op.batch_alter_table("facility", schema=None) as batch_op:
        batch_op.add_column(sa.Column("recipient_name", sa.String(length=200), nullable=True))
        batch_op.add_column(sa.Column("payment_method", sa.String(length=20), nullable=True))

    # The keys certified so far, so that a renewal reusing one of them is refused.
    conn = op.get_bind()
    cc = sa.table(
        "client_certificate",
        sa.column("id", sa.Integer()),
        sa.column("certificate_der", sa.LargeBinary()),
        sa.column("spki_sha256", sa.String()),
    )
    for row in conn.execute(sa.select(cc.c.id, cc.c.certificate_der)).all():
        spki = (
            x509.load_der_x509_certificate(row.certificate_der)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        conn.execute(
            sa.update(cc)
            .where(cc.c.id == row.id)
            .values(spki_sha256=hashlib.sha256(spki).hexdigest())
        )


def downgrade() -> None:
    with op.batch_alter_table("facility", schema=None) as batch_op:
        batch_op.drop_column("payment_method")
        batch_op.drop_column("recipient_name")

    with op.batch_alter_table("client_certificate", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_client_certificate_vendor_id_vendor"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_client_certificate_vendor_id"))
        batch_op.drop_index(batch_op.f("ix_client_certificate_spki_sha256"))
        batch_op.drop_column("spki_sha256")
        batch_op.drop_column("vendor_id")

    op.drop_table("vendor_facility")
    with op.batch_alter_table("fee_entry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_fee_entry_facility_id"))

    op.drop_table("fee_entry")
    with op.batch_alter_table("application", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_application_institution_code"))
        batch_op.drop_index(batch_op.f("ix_application_facility_id"))

    op.drop_table("application")
    op.drop_table("vendor")
