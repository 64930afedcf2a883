"""Status codes of the protocol (docs/protocol.md, "The call" and "HRESULTs") and the
exceptions that carry them."""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .kms import BaseRequest


class HResult(IntEnum):
    """HRESULTs a KMS host returns in the NDR return value, or a client reports."""

    S_OK = 0x00000000
    INVALID_DATA = 0x8007000D  # HRESULT_FROM_WIN32(ERROR_INVALID_DATA)
    KMS_ID_MISMATCH = 0xC004F042  # SL_E_VL_KEY_MANAGEMENT_SERVICE_ID_MISMATCH
    INVALID_TIMESTAMP = 0xC004F06C  # SL_E_VL_INVALID_TIMESTAMP
    NOT_ENOUGH_COUNT = 0xC004F038  # SL_E_VL_NOT_ENOUGH_COUNT (client side)
    BINDING_SERVICE_UNAVAILABLE = 0xC004F074  # SL_E_VL_BINDING_SERVICE_UNAVAILABLE (client side)


# What each HRESULT tells a client: its Windows name and meaning (hosts send no reason with it).
HRESULT_MEANINGS: dict[int, str] = {
    HResult.INVALID_DATA: "ERROR_INVALID_DATA: the host could not read the request",
    HResult.KMS_ID_MISMATCH: (
        "SL_E_VL_KEY_MANAGEMENT_SERVICE_ID_MISMATCH: the host does not serve this KMS ID"
        " (a retail, preview or unknown product, or one of another application)"
    ),
    HResult.INVALID_TIMESTAMP: (
        "SL_E_VL_INVALID_TIMESTAMP: the request's time is too far from the host's clock"
    ),
    HResult.NOT_ENOUGH_COUNT: "SL_E_VL_NOT_ENOUGH_COUNT: the host's count is below the threshold",
    HResult.BINDING_SERVICE_UNAVAILABLE: "SL_E_VL_BINDING_SERVICE_UNAVAILABLE: no host answered",
}


def describe_hresult(status: int) -> str:
    """`0xC004F042 SL_E_VL_...: meaning`; a code outside the table as itself."""
    meaning = HRESULT_MEANINGS.get(status, "(not one KMS hosts are known to send)")
    return f"0x{status:08X} {meaning}"


class FaultStatus(IntEnum):
    """nca status codes carried by a DCE-RPC fault PDU."""

    PROTO_ERROR = 0x1C01000B
    UNK_IF = 0x1C010003
    OP_RNG_ERROR = 0x1C010002
    BAD_STUB_DATA = 0x000006F7  # nca_s_fault_ndr / RPC_X_BAD_STUB_DATA
    SERVER_TOO_BUSY = 0x1C010014  # nca_s_server_too_busy


class KmsError(Exception):
    """A KMS message was refused; the host answers with `hresult` in the NDR error form."""

    def __init__(self, hresult: int, reason: str) -> None:
        code = f"0x{hresult:08X}"
        known = hresult in HResult._value2member_map_
        name = HResult(hresult).name if known else "outside the known HRESULTs"
        super().__init__(reason if code in reason else f"{reason} (HRESULT {code} {name})")
        self.hresult = hresult  # an HResult, or (received from a host) any code
        self.reason = reason
        self.request: BaseRequest | None = None  # set when the request had been decoded


class StubError(Exception):
    """An NDR stub that does not hold what its own size fields say."""


class NotGenuine(Exception):
    """A reply that fails a check a strict client makes (docs/protocol.md, "What a strict
    client checks"); `check` names it."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail
