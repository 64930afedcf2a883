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

# One token of named.conf syntax: a quoted string, a brace or semicolon, a bare word, or a
# comment (#, //, /* */) to skip. Strings come first, so that `//` or `/*` inside a quoted
# base64 secret stays part of it.
_TOKEN = re.compile(
    r'"(?P<string>(?:[^"\\]|\\.)*)"|(?P<punct>[{};])|(?P<comment>(?:#|//)[^\n]*|/\*.*?\*/)'
    r'|(?P<word>(?:[^\s{};"#/]|/(?![/*]))+)|(?P<space>\s+)|(?P<bad>.)',
    re.S,
)


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file and the problem."""


def tokens(text: str, origin: str = "key file") -> list[str]:
    """The words, strings (without quotes; a leading quote marks them) and punctuation."""
    result = []
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup
        if kind == "string":
            result.append('"' + re.sub(r"\\(.)", r"\1", match.group("string")))
        elif kind in ("punct", "word"):
            result.append(match.group())
        elif kind == "bad":
            line = text.count("\n", 0, match.start()) + 1
            raise KeyFileError(f"{origin}, line {line}: unexpected {match.group()!r}")
    return result


Statement = tuple[list[str], list["Statement"]]  # (words before the block, its statements)


def statements(items: list[str], origin: str = "key file") -> list[Statement]:
    """named.conf's grammar: `word... [{ statement... }] ;`, nested."""
    position = 0

    def block(closing: str | None) -> list[Statement]:
        nonlocal position
        found: list[Statement] = []
        while position < len(items) and items[position] != closing:
            if items[position] == "}":
                raise KeyFileError(f"{origin}: unexpected '}}'")
            words: list[str] = []
            inner: list[Statement] = []
            while position < len(items) and items[position] not in (";", "{", "}"):
                words.append(items[position])
                position += 1
            if position < len(items) and items[position] == "{":
                position += 1
                inner = block("}")
                position += 1  # the closing brace
            if position >= len(items) or items[position] != ";":
                raise KeyFileError(f"{origin}: missing ';' after {' '.join(words) or '}'!r}")
            position += 1
            found.append((words, inner))
        if closing is not None and position >= len(items):
            raise KeyFileError(f"{origin}: missing '}}'")
        return found

    return block(None)


def _text(token: str) -> str:
    return token.removeprefix('"')


def parse_keys(text: str, origin: str = "key file") -> list[dns.tsig.Key]:
    """Every `key` statement of `text`, in order."""
    keys = []
    for words, inner in statements(tokens(text, origin), origin):
        if len(words) != 2 or words[0] != "key":
            continue
        name = _text(words[1])
        fields = {w[0]: _text(w[1]) for w, _ in inner if len(w) == 2}
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
