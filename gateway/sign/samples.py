"""Sample CSVs of an e-prescription and of a dispensing result (TEST data, no real patient).

The sandbox signs them into its sample documents and the portal offers them to sign: one text.
"""

from __future__ import annotations

__all__ = ["DISPENSING_CSV", "PRESCRIPTION_CSV"]

PRESCRIPTION_CSV = (
    "1,1,1310000011,13,1,TEST 中央病院\r\n"
    "2,患者,試験　花子,1,19800101\r\n"
    "201,1,1,1,2,622688101,ミニリンメルトＯＤ錠２５μｇ,2,1,錠\r\n"
).encode()
DISPENSING_CSV = (
    "1,1,1340000019,TEST さくら薬局\r\n201,1,1,1,2,622688101,ミニリンメルトＯＤ錠２５μｇ,2,1,錠\r\n"
).encode()
