"""TSIG keys in BIND's key file format, as `tsig-keygen` writes them:

key "kmsd-key" {
    algorithm hmac-sha256;
    secret "base64==";
};
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path

import dns.name
import dns.tsig

from ..files import read_text

# HMAC algorithms BIND offers; GSS-TSIG needs a Kerberos exchange and is not a file key.
ALGORITHMS = {
    "hmac-md5": dns.tsig.HMAC_MD5,
    "hmac-sha1": dns.tsig.HMAC_SHA1,
    "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256,
    "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}

_COMMENT = re.compile(r"(#|//)[^\n]*|/\*.*?\*/", re.S)
_KEY = re.compile(r'key\s+("([^"]+)"|([^\s{]+))\s*\{(.*?)\}\s*;', re.S)
_STATEMENT = re.compile(r'\s*([a-z-]+)\s+("([^"]*)"|([^;\s]+))\s*;', re.S)


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the problem."""


def parse_keys(text: str, origin: str = "key file") -> list[dns.tsig.Key]:
    """Every `key` statement of `text`, in order."""
    text = _COMMENT.sub("", text)
    keys = []
    for match in _KEY.finditer(text):
        name = match.group(2) or match.group(3)
        fields = {m.group(1): m.group(3) or m.group(4) for m in _STATEMENT.finditer(match.group(4))}
        algorithm = fields.get("algorithm", "").lower()
        if algorithm not in ALGORITHMS:
            known = ", ".join(ALGORITHMS)
            raise KeyFileError(
                f"{origin}: key {name!r}: algorithm {algorithm!r} is not one of {known}"
            )
        try:
            secret = base64.b64decode(fields.get("secret", ""), validate=True)
        except binascii.Error:
            secret = b""
        if not secret:
            raise KeyFileError(f"{origin}: key {name!r}: secret is missing or not base64")
        keys.append(dns.tsig.Key(dns.name.from_text(name), secret, ALGORITHMS[algorithm]))
    if not keys:
        raise KeyFileError(f'{origin}: no key "NAME" {{ algorithm ...; secret "..."; }}; statement')
    return keys


def read_key(path: Path) -> dns.tsig.Key:
    """The first key of a BIND key file."""
    try:
        text = read_text(path)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc}") from None
    return parse_keys(text, str(path))[0]
