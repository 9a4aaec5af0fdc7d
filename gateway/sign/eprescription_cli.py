"""``hpki-gateway eprescription build|sign`` inputs: the CSV or unsigned document, the id and,
for a dispensing result, the signed prescription it embeds."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from lxml import etree

from gateway.sign import eprescription

__all__ = ["add_arguments", "build", "input_from_args"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--document-id", default=None, help="PrescriptionId / DispensingId (UUID; default: new)"
    )
    p.add_argument(
        "--prescription",
        default=None,
        help="jp-dispensing: the signed prescription XML the dispensing result embeds",
    )


def input_from_args(args: argparse.Namespace) -> eprescription.EPrescriptionInput:
    prescription = Path(args.prescription).read_bytes() if args.prescription else None
    return eprescription.EPrescriptionInput(
        document_id=args.document_id, prescription=prescription, encoding=args.encoding
    )


async def build(
    args: argparse.Namespace,
    read_input: Callable[[str], bytes],
    write_output: Callable[[str, bytes], None],
) -> int:
    data = read_input(args.csv)
    profile = eprescription.PROFILES[args.profile]
    tree = eprescription.prepare_document(data, profile, input_from_args(args))
    write_output(args.out, etree.tostring(tree, xml_declaration=True, encoding="UTF-8"))
    return 0
