"""Local signing with the doctor's HPKI card: the agent (CSC-shaped API on loopback) and
batch signing. Nothing here runs on the gateway server."""
