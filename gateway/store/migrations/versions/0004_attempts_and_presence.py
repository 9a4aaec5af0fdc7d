"""enrollment checks under way; the presence method of a SAD

enrollment.checking_tries and certificate_delivery.checking_attempts count password checks
under way apart from wrong passwords;
sad.presence records how the signer proved presence (fido2 for every existing SAD);
webauthn_challenge.fido2_state keeps the state python-fido2 returned with the challenge.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrollment", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("checking_tries", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("certificate_delivery", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("checking_attempts", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("webauthn_challenge", schema=None) as batch_op:
        batch_op.add_column(sa.Column("fido2_state", sa.Text(), nullable=True))
    with op.batch_alter_table("sad", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("presence", sa.String(length=20), nullable=False, server_default="fido2")
        )


def downgrade() -> None:
    with op.batch_alter_table("certificate_delivery", schema=None) as batch_op:
        batch_op.drop_column("checking_attempts")
    with op.batch_alter_table("webauthn_challenge", schema=None) as batch_op:
        batch_op.drop_column("fido2_state")
    with op.batch_alter_table("sad", schema=None) as batch_op:
        batch_op.drop_column("presence")
    with op.batch_alter_table("enrollment", schema=None) as batch_op:
        batch_op.drop_column("checking_tries")
