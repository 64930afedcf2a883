"""Status codes of the protocol (PROTOCOL.md §3.10, §10) and the exceptions that carry them."""

from __future__ import annotations

from enum import IntEnum


class HResult(IntEnum):
    """HRESULTs a KMS host returns in the NDR return value, or a client reports."""

    S_OK = 0x00000000
    INVALID_DATA = 0x8007000D  # HRESULT_FROM_WIN32(ERROR_INVALID_DATA)
    KMS_ID_MISMATCH = 0xC004F042  # SL_E_VL_KEY_MANAGEMENT_SERVICE_ID_MISMATCH
    INVALID_TIMESTAMP = 0xC004F06C  # SL_E_VL_INVALID_TIMESTAMP
    NOT_ENOUGH_COUNT = 0xC004F038  # SL_E_VL_NOT_ENOUGH_COUNT (client side)
    BINDING_SERVICE_UNAVAILABLE = 0xC004F074  # SL_E_VL_BINDING_SERVICE_UNAVAILABLE (client side)


class FaultStatus(IntEnum):
    """nca status codes carried by a DCE-RPC fault PDU."""

    PROTO_ERROR = 0x1C01000B
    UNK_IF = 0x1C010003
    OP_RNG_ERROR = 0x1C010002
    BAD_STUB_DATA = 0x000006F7  # nca_s_fault_ndr / RPC_X_BAD_STUB_DATA
    SERVER_TOO_BUSY = 0x1C010014  # nca_s_server_too_busy


class KmsError(Exception):
    """A KMS message was refused; the host answers with `hresult` in the NDR error form."""

    def __init__(self, hresult: HResult, reason: str) -> None:
        super().__init__(f"{reason} (HRESULT 0x{hresult:08X} {hresult.name})")
        self.hresult = hresult
        self.reason = reason


class StubError(Exception):
    """An NDR stub that does not hold what its own size fields say."""


class NotGenuine(Exception):
    """A reply that fails a check a strict client makes (PROTOCOL.md §6); `check` names it."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail
