"""An activation result for a person (text) and for tools (JSON, schema kmsclient.activate/1)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from kmsd.protocol.constants import unix_time
from kmsd.protocol.epid import Epid
from kmsd.protocol.kms import guid_text, product_uuid
from kmsd.protocol.products import products
from kmsd.text import inert

from .activation import Result
from .outcome import Status

SCHEMA = "kmsclient.activate/1"
PLATFORMS = {
    55041: "Windows Vista/7 or Server 2008/2008 R2",
    5426: "Windows 8 or Server 2012",
    6401: "Windows 8.1 or Server 2012 R2",
    3612: "Windows 10/11 or Server 2016 and later",
}


def iso_time(filetime_value: int) -> str:
    moment = dt.datetime.fromtimestamp(unix_time(filetime_value), dt.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def epid_fields(epid: Epid) -> dict[str, Any]:
    return {
        "platform": epid.platform,
        "platform_name": PLATFORMS.get(epid.platform, "unknown platform"),
        "group_id": epid.group_id,
        "key_id": epid.key_id,
        "lcid": epid.lcid,
        "build": epid.build,
        "activated": epid.activated.isoformat(),
    }


def hresult_text(value: int | None) -> str | None:
    return None if value is None else f"0x{value:08X}"


def to_json(result: Result) -> dict[str, Any]:
    base = result.request.base
    db = products()
    response: dict[str, Any] | None = None
    if result.verified is not None:
        reply, epid = result.verified.reply, result.verified.epid
        response = {
            "count": reply.base.count,
            "required_count": base.required_count,
            "epid": reply.base.epid,
            "epid_decoded": epid_fields(epid),
            "hwid": reply.hwid.hex().upper() or None,
            "activation_interval": reply.base.activation_interval,
            "renewal_interval": reply.base.renewal_interval,
            "response_time_ms": round((result.response_time or 0) * 1000, 3),
        }
    failure = result.failure
    hresult = failure.hresult if failure else None
    if result.status == Status.BELOW_THRESHOLD:
        hresult = 0xC004F038  # SL_E_VL_NOT_ENOUGH_COUNT, what the client reports
    return {
        "schema": SCHEMA,
        "status": result.status.label,
        "exit_status": int(result.status),
        "host": str(result.target),
        "product": {
            "name": db.product_name(
                product_uuid(base.sku_id),
                product_uuid(base.kms_id),
                product_uuid(base.application_id),
            ),
            "sku_id": guid_text(base.sku_id),
            "kms_id": guid_text(base.kms_id),
            "application_id": guid_text(base.application_id),
        },
        "request": {
            "protocol": f"{base.major}.{base.minor}",
            "client_machine_id": base.cmid_text,
            "previous_client_machine_id": guid_text(base.previous_client_machine_id),
            "workstation": base.workstation,
            "required_count": base.required_count,
            "request_time": iso_time(base.request_time),
            "is_vm": bool(base.is_vm),
            "license_status": base.license_status,
        },
        "rpc": {
            "context_id": result.context_id,
            "ndr": None if result.ndr64 is None else ("NDR64" if result.ndr64 else "NDR32"),
        },
        "response": response,
        "error": None
        if failure is None and hresult is None
        else {
            "kind": failure.kind if failure else "below threshold",
            "message": failure.message if failure else "count below the N policy",
            "hresult": hresult_text(hresult),
            "check": failure.check if failure else None,
        },
        "warnings": list(result.warnings),
    }


def to_text(result: Result) -> str:
    data = to_json(result)
    base = result.request.base
    rows = [
        ("Host", data["host"]),
        ("Product", f"{data['product']['name']} (SKU {guid_text(base.sku_id)})"),
        (
            "Protocol",
            f"V{base.major}"
            + (f", {data['rpc']['ndr']}" if result.ndr64 is not None else "")
            + (f" on context {result.context_id}" if result.context_id is not None else ""),
        ),
        ("Client machine ID", base.cmid_text),
    ]
    response = data["response"]
    if result.status == Status.ACTIVATED:
        verdict = f"activated: count {response['count']} >= {base.required_count} required"
    elif result.status == Status.BELOW_THRESHOLD:
        verdict = (
            f"not activated: count {response['count']} < {base.required_count} required "
            "(0xC004F038 SL_E_VL_NOT_ENOUGH_COUNT)"
        )
    else:
        assert result.failure is not None
        verdict = f"{result.status.label.replace('_', ' ')}: {result.failure.message}"
        code = hresult_text(result.failure.hresult)
        if code is not None and code not in verdict:
            verdict += f" [{code}]"
    rows.append(("Result", verdict))
    if response is not None:
        epid = response["epid_decoded"]
        rows += [
            ("ePID", response["epid"]),
            (
                "  decodes to",
                f"platform {epid['platform']:05d} ({epid['platform_name']}), "
                f"group {epid['group_id']}, key id {epid['key_id']}, LCID {epid['lcid']}, "
                f"host build {epid['build']}, host key activated {epid['activated']}",
            ),
            ("HWID", response["hwid"] or "(none in V4/V5)"),
            (
                "Intervals",
                f"activation {response['activation_interval']} min, "
                f"renewal {response['renewal_interval']} min",
            ),
            ("Response time", f"{response['response_time_ms']:.1f} ms"),
        ]
    rows += [("Warning", w) for w in result.warnings]
    width = max(len(k) for k, _ in rows)
    # The ePID and the messages carry what the host sent: shown inert.
    return "\n".join(f"{k:<{width}}  {inert(v)}" for k, v in rows)
