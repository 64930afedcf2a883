"""Facts of the KMS service that the host, the client and the DNS parts share, each once.

The DCE-RPC facts (fragment sizes, the BTFN features) live with the PDUs in rpc.py.
"""

from __future__ import annotations

KMS_PORT = 1688  # TCP port of a KMS host
SRV_SERVICE = "_vlmcs._tcp"  # the SRV owner prefix under which KMS hosts are published
DNS_PORT = 53

# The intervals a host tells its clients, in minutes: retry while not activated, renew.
DEFAULT_ACTIVATION_INTERVAL = 120
DEFAULT_RENEWAL_INTERVAL = 10080  # 7 days

# A FILETIME counts 100 ns intervals since 1601-01-01 UTC (the KMS request time).
FILETIME_UNIX_EPOCH = 116444736000000000  # 1970-01-01 as a FILETIME
_FILETIME_PER_SECOND = 10_000_000


def filetime(unix: float) -> int:
    """The FILETIME of Unix time `unix`."""
    return FILETIME_UNIX_EPOCH + int(unix * _FILETIME_PER_SECOND)


def unix_time(filetime_value: int) -> float:
    """The Unix time of a FILETIME."""
    return (filetime_value - FILETIME_UNIX_EPOCH) / _FILETIME_PER_SECOND
