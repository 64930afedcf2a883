"""GSS-TSIG (RFC 3645): dynamic updates signed with a Kerberos security context, as Active
Directory-integrated zones demand.

The host authenticates as a Kerberos principal: from a keytab (kmsd then gets and renews its
own tickets, kept in memory) or from a credential cache another tool keeps fresh (the
service user's, `kinit`/`k5start`). A TKEY exchange (RFC 2930, mode 3) with the DNS server
sets up a context under a fresh key name; updates are then signed with TSIG whose MAC is a
GSS-API MIC. The context is set up again before its ticket expires and whenever the server
no longer knows the key.

The `gssapi` binding (the `kmsd[gss]` extra) is imported only when GSS-TSIG is configured.
Its calls may talk to the KDC and block, so they run in a worker thread.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TKEY
import dns.rrset
import dns.tsig

TKEY_MODE_GSSAPI = 3  # RFC 2930 section 2.5
TKEY_LIFETIME = 86400  # seconds asked for; the ticket's own lifetime bounds the context
RENEW_MARGIN = 300.0  # set up a new context this long before the current one expires
MAX_ROUNDS = 4  # TKEY round trips before giving up (Kerberos needs one)

# What GSS-API/Kerberos messages mean for an operator, first match wins.
_REASONS = (
    ("clock skew", ("skew",)),
    (
        "no ticket",
        (
            "no kerberos credentials",
            "no credentials cache",
            "credentials cache file",
            "ticket expired",
            "no credentials were supplied",
        ),
    ),
    ("principal not in keytab", ("key table entry not found", "no key table entry")),
    ("keytab unreadable", ("key table file", "keytab")),
    ("KDC unreachable", ("cannot contact any kdc", "cannot find kdc", "unable to reach")),
    ("unknown principal", ("not found in kerberos database",)),
    ("wrong password or key", ("preauthentication failed", "integrity check", "decrypt")),
    ("account disabled or locked", ("revoked", "disabled", "locked")),
)


class GssError(Exception):
    """A security context could not be set up: `reason` in a few words, `detail` in full."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def reason_of(message: str) -> str:
    """The operator's words for a GSS-API/Kerberos error message; the Kerberos (minor)
    part says more than the GSS-API (major) one, so it is read first."""
    lowered = message.lower()
    for part in (lowered.partition("minor")[2], lowered):
        for reason, needles in _REASONS:
            if any(n in part for n in needles):
                return reason
    return "GSS-API error"


@dataclass(frozen=True)
class GssCredentials:
    """Who kmsd is to the DNS server and whom it talks to."""

    principal: str | None = None  # e.g. KMS1$@LAB.TEST; None: the credential cache's own
    keytab: Path | None = None  # None: tickets come from the credential cache
    ccache: str | None = None  # None: the default cache (KRB5CCNAME), or memory with a keytab
    service: str | None = None  # the server's principal, DNS@host or DNS/host@REALM;
    # None: DNS@ the zone's primary name server (its SOA MNAME)

    def describe(self) -> str:
        who = self.principal or "the credential cache's principal"
        return f"{who} ({'keytab ' + str(self.keytab) if self.keytab else 'credential cache'})"


def _gssapi() -> Any:
    try:
        import gssapi
    except ImportError:
        raise GssError(
            "gssapi missing",
            "GSS-TSIG needs the python gssapi binding: pip install 'kmsd[gss]'",
        ) from None
    return gssapi


def _credentials(gssapi: Any, creds: GssCredentials) -> Any:
    store: dict[str, str] = {}
    if creds.keytab is not None:
        store["client_keytab"] = str(creds.keytab)
        # Tickets got from the keytab stay in this process, renewed from the keytab.
        store["ccache"] = creds.ccache or f"MEMORY:kmsd:{creds.principal}:{creds.keytab}"
    elif creds.ccache is not None:
        store["ccache"] = creds.ccache
    name = None
    if creds.principal is not None:
        name = gssapi.Name(creds.principal, gssapi.NameType.kerberos_principal)
    if store:
        return gssapi.Credentials(name=name, usage="initiate", store=store)
    return gssapi.Credentials(name=name, usage="initiate")


def _target(gssapi: Any, service: str) -> Any:
    if "@" in service and "/" not in service:
        return gssapi.Name(service, gssapi.NameType.hostbased_service)
    return gssapi.Name(service, gssapi.NameType.kerberos_principal)


class _Context:
    """A GSS-API initiator context as dnspython's GSS-TSIG uses it (get/verify signature)."""

    def __init__(self, creds: GssCredentials, service: str) -> None:
        gssapi = _gssapi()
        self._errors: tuple[type[Exception], ...] = (gssapi.exceptions.GSSError,)
        try:
            flags = gssapi.RequirementFlag
            self.inner = gssapi.SecurityContext(
                name=_target(gssapi, service),
                creds=_credentials(gssapi, creds),
                usage="initiate",
                flags=flags.mutual_authentication | flags.integrity,
            )
        except self._errors as exc:
            raise _error(exc) from None

    def step(self, token: bytes | None) -> bytes | None:
        try:
            out: bytes | None = self.inner.step(token)
        except self._errors as exc:
            raise _error(exc) from None
        return out

    @property
    def complete(self) -> bool:
        return bool(self.inner.complete)

    def expires(self, now: float) -> float:
        lifetime = self.inner.lifetime
        return now + (TKEY_LIFETIME if lifetime is None else float(lifetime))

    def get_signature(self, data: bytes) -> bytes:
        signature: bytes = self.inner.get_signature(data)
        return signature

    def verify_signature(self, data: bytes, signature: bytes) -> None:
        self.inner.verify_signature(data, signature)


def _error(exc: Exception) -> GssError:
    detail = " ".join(str(exc).split())
    return GssError(reason_of(detail), detail)


class SambaVariant:
    """Samba's AD DNS server signs its answer to a signed request over the request's MAC
    *without* the two length bytes RFC 2845 puts before it. Verifying with this wrapper
    (and no request MAC given to dnspython) checks such an answer."""

    def __init__(self, context: Any, request_mac: bytes) -> None:
        self.context = context
        self.request_mac = request_mac

    def verify_signature(self, data: bytes, signature: bytes) -> None:
        self.context.verify_signature(self.request_mac + data, signature)


Exchange = Callable[[dns.message.Message, tuple[str, int]], Awaitable[bytes]]


class GssSigner:
    """The TSIG key of a GSS-API context with one DNS server, set up and renewed on demand."""

    def __init__(
        self,
        creds: GssCredentials,
        *,
        context: Callable[[GssCredentials, str], Any] = _Context,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.creds = creds
        self.make_context = context
        self.clock = clock
        self.key: dns.tsig.Key | None = None
        self.server: tuple[str, int] | None = None
        self.expires = 0.0

    def forget(self) -> None:
        """Drop the context (the server forgot it, or refused it): the next use sets up anew."""
        self.key = None

    async def signing_key(
        self, server: tuple[str, int], service: str, exchange: Exchange
    ) -> dns.tsig.Key:
        """A key valid with `server` for a while yet; GssError when none can be set up."""
        now = self.clock()
        if self.key is not None and self.server == server and now < self.expires - RENEW_MARGIN:
            return self.key
        self.key = None
        context = await asyncio.to_thread(self.make_context, self.creds, service)
        name = dns.name.from_text(f"{secrets.token_hex(8)}.sig-kmsd", origin=dns.name.root)
        token = await asyncio.to_thread(context.step, None)
        for _ in range(MAX_ROUNDS):
            assert token is not None
            wire = await exchange(tkey_query(name, token, int(now)), server)
            reply = dns.message.from_wire(wire, keyring=False)
            token = tkey_answer(reply, name)
            token = await asyncio.to_thread(context.step, token)
            if context.complete:
                break
        else:
            raise GssError("TKEY exchange unfinished", f"{MAX_ROUNDS} rounds and no context")
        key = dns.tsig.Key(name, context, dns.tsig.GSS_TSIG)
        if reply.had_tsig:
            try:  # the server's last answer is signed with the new context
                dns.message.from_wire(wire, keyring=key)
            except dns.exception.DNSException as exc:
                raise GssError("server not authenticated", f"TKEY answer: {exc}") from None
        self.key, self.server = key, server
        self.expires = context.expires(self.clock())
        return key


def tkey_query(name: dns.name.Name, token: bytes, now: int) -> dns.message.Message:
    """A TKEY query offering a GSS-API token under key name `name` (RFC 3645 section 3.1.1)."""
    query = dns.message.make_query(name, dns.rdatatype.TKEY, dns.rdataclass.ANY)
    rdata = dns.rdtypes.ANY.TKEY.TKEY(  # type: ignore[no-untyped-call]
        dns.rdataclass.ANY,
        dns.rdatatype.TKEY,
        dns.tsig.GSS_TSIG,
        now,
        now + TKEY_LIFETIME,
        TKEY_MODE_GSSAPI,
        0,
        token,
    )
    query.additional.append(dns.rrset.from_rdata(name, 0, rdata))
    return query


def tkey_answer(reply: dns.message.Message, name: dns.name.Name) -> bytes:
    """The server's GSS-API token; GssError for a refusal."""
    if reply.rcode() != dns.rcode.NOERROR:
        rcode = dns.rcode.to_text(reply.rcode())
        raise GssError("TKEY refused", f"the server answered {rcode}")
    try:
        rrset = reply.find_rrset(reply.answer, name, dns.rdataclass.ANY, dns.rdatatype.TKEY)
    except KeyError:
        raise GssError("TKEY refused", "the server's answer has no TKEY record") from None
    rdata = rrset[0]
    assert isinstance(rdata, dns.rdtypes.ANY.TKEY.TKEY)
    if rdata.error != 0:
        raise GssError("TKEY refused", f"TKEY error {dns.rcode.to_text(rdata.error)}")
    return bytes(rdata.key)


def keytab_principals(keytab: Path) -> list[str]:
    """The principals a keytab holds (read locally, no KDC): ValueError when unreadable."""
    try:
        with keytab.open("rb"):
            pass
    except OSError as exc:
        raise ValueError(f"keytab {keytab}: cannot read: {exc.strerror or exc}") from None
    try:
        result = subprocess.run(
            ["klist", "-k", str(keytab)], capture_output=True, text=True, timeout=10
        )
    except FileNotFoundError:
        raise ValueError(f"keytab {keytab}: klist is missing (install krb5-user)") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ValueError(f"keytab {keytab}: cannot list it with klist -k: {exc}") from None
    if result.returncode != 0:
        raise ValueError(f"keytab {keytab}: {result.stderr.strip() or 'klist -k failed'}")
    found = []
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0].isdigit():
            found.append(fields[1])
    return sorted(set(found))


def check_keytab(keytab: Path, principal: str | None) -> None:
    """ValueError unless `keytab` is readable and holds keys for `principal` (any principal
    when None; a principal without @REALM matches it in any realm). Contacts nothing."""
    held = keytab_principals(keytab)
    if not held:
        raise ValueError(f"keytab {keytab}: holds no keys")
    if principal is None or principal in held:
        return
    if "@" not in principal and any(p.rsplit("@", 1)[0] == principal for p in held):
        return
    raise ValueError(f"keytab {keytab} holds no key for {principal} (it holds {', '.join(held)})")
