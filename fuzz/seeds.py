"""Seed corpora for the fuzz targets, made from the captured exchanges and our own encoders.

python -m fuzz.seeds DIR writes DIR/<target>/<n> files.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import dnslib

from kmsd.protocol import ndr
from kmsd.protocol.client import base_request
from kmsd.protocol.kms import encode_request
from kmsd.protocol.products import products

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "fixtures" / "vectors"


def seeds() -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {
        "rpc_pdu": [],
        "connection": [],
        "ndr_stubs": [],
        "kms_v4": [],
        "kms_v5": [],
        "kms_v6": [],
        "kms_response": [],
        "config_file": [],
        "dns_reply": [],
        "dns_query": [],
    }
    for path in sorted(VECTORS.glob("*.json"))[:20]:
        vector = json.loads(path.read_text())
        streams: dict[int, bytes] = {}
        for pdu, dec in zip(vector["pdus"], vector["decoded"], strict=True):
            data = bytes.fromhex(pdu["hex"])
            out["rpc_pdu"].append(data)
            if pdu["dir"] == "c2s":
                streams[pdu["connection"]] = streams.get(pdu["connection"], b"") + data
            if (
                "kms_response_hex" in dec
                and "kms_request_hex" in vector["decoded"][dec["index"] - 1]
            ):
                request = bytes.fromhex(vector["decoded"][dec["index"] - 1]["kms_request_hex"])
                out["kms_response"].append(
                    request[:236] + bytes(16) + bytes.fromhex(dec["kms_response_hex"])
                )
        out["connection"] += streams.values()
    sku = products().sku_by_name("Windows 10/11 Enterprise")
    assert sku is not None
    for major in (4, 5, 6):
        message = encode_request(base_request(sku, major=major), iv=os.urandom(16))
        out[f"kms_v{major}"].append(message[4:])
        out["ndr_stubs"] += [ndr.wrap_request(message, False), ndr.wrap_request(message, True)]
    out["config_file"].append((ROOT / "deploy" / "kmsd.toml").read_bytes())
    query = dnslib.DNSRecord.question("_vlmcs._tcp.lab.test", "SRV")
    out["dns_query"] += [query.pack(), dnslib.DNSRecord.question("kms1.lab.test", "A").pack()]
    reply = query.reply()
    reply.add_answer(
        *dnslib.RR.fromZone(
            "_vlmcs._tcp.lab.test. 300 IN SRV 0 10 1688 kms1.lab.test.\n"
            "_vlmcs._tcp.lab.test. 300 IN SRV 1 0 1688 kms2.lab.test."
        )
    )
    reply.add_ar(*dnslib.RR.fromZone("kms1.lab.test. 300 IN A 127.0.0.1"))
    out["dns_reply"].append(reply.pack())
    out["config_file"].append(b'[network]\nlisten = ["127.0.0.1:1688"]\n[host]\nstrict = true\n')
    return out


def main() -> None:
    target_dir = Path(sys.argv[1])
    for name, items in seeds().items():
        (target_dir / name).mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(items):
            (target_dir / name / f"seed-{i:03d}").write_bytes(data)


if __name__ == "__main__":
    main()
