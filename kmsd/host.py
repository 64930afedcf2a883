"""The KMS host: a request's bytes in, the response's bytes out (docs/protocol.md, Counting).

Pure: time and randomness are passed in; the client count comes from a CountStore.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from uuid import UUID

from .cache import MAX_REQUIRED_COUNT, CountStore
from .protocol.constants import DEFAULT_ACTIVATION_INTERVAL, DEFAULT_RENEWAL_INTERVAL, unix_time
from .protocol.crypto import RandomPool, RandomSource
from .protocol.epid import generate_epid
from .protocol.errors import HResult, KmsError
from .protocol.kms import (
    BaseRequest,
    BaseResponse,
    KmsRequest,
    decode_request,
    encode_response,
    guid_text,
    product_uuid,
)
from .protocol.products import ProductDatabase, products
from .rules import KMS_TAMPER_CHECKS, Response
from .tamper import tampered_response


@dataclass
class HostIdentity:
    """What a client sees of the host beyond the count: its HWID and ePIDs.

    `epids` maps a host-key family (Csvlk.key) to its ePID; `overrides` maps a KMS
    counted ID to an ePID the operator set.
    """

    hwid: bytes
    epids: dict[str, str] = field(default_factory=dict)
    overrides: dict[UUID, str] = field(default_factory=dict)

    def complete(self, database: ProductDatabase, random: RandomSource, now: float) -> bool:
        """Generate the ePID of every host key that has none; True if any was added."""
        today = dt.datetime.fromtimestamp(now, dt.UTC).date()
        missing = [c for c in database.csvlks.values() if c.key not in self.epids]
        for csvlk in missing:
            self.epids[csvlk.key] = str(generate_epid(csvlk, today=today, random=random))
        return bool(missing)


@dataclass(frozen=True, slots=True)
class HostPolicy:
    activation_interval: int = DEFAULT_ACTIVATION_INTERVAL
    renewal_interval: int = DEFAULT_RENEWAL_INTERVAL
    strict: bool = False  # refuse unknown, retail and preview KMS IDs and App/KMS mismatches
    verify: bool = True  # check V4 MACs and V5/V6 padding of requests
    max_clock_skew: float | None = None  # seconds; None: any request time is accepted
    fixed_count: int | None = None  # lab override: report this count to everyone
    precharge: int = 0  # lab override: report as if this many other clients were counted

    def reported(self, counted: int) -> int:
        """The count clients are told when `counted` clients are in the table."""
        return self.fixed_count if self.fixed_count is not None else counted + self.precharge

    @property
    def override(self) -> str | None:
        """The lab override in force, in words ("precharge 24"); None: the real count."""
        if self.fixed_count is not None:
            return f"fixed count {self.fixed_count}"
        return f"precharge {self.precharge}" if self.precharge else None


@dataclass(frozen=True, slots=True)
class _Product:
    """What the product database says of one (application, SKU, KMS ID) triple."""

    name: str
    application: str
    known: bool  # the KMS ID is in the database
    csvlk: str  # the host key family that answers it
    kms_id: UUID  # what the identity's ePID overrides are keyed by


_MAX_PRODUCTS = 4096  # triples remembered; a peer sending random IDs only refills the memo


@dataclass(slots=True)  # made per request; not frozen, whose __init__ costs 3x
class Activation:
    """One answered request, for logs and metrics."""

    request: BaseRequest
    count: int
    epid: str
    product: str
    application: str
    known: bool


class KmsHost:
    """Answers requests. `identity` must hold an ePID for every host key of the database
    (HostIdentity.complete) unless overrides cover every KMS ID it will see."""

    def __init__(
        self,
        counter: CountStore,
        identity: HostIdentity,
        policy: HostPolicy = HostPolicy(),
        *,
        random: RandomSource | None = None,
        database: ProductDatabase | None = None,
    ) -> None:
        """`random`: where salts and IVs come from (default: a RandomPool)."""
        self.counter = counter
        self.identity = identity
        self.policy = policy
        self.random = random or RandomPool()
        self.products = database or products()
        # Keyed by the IDs' 48 bytes as sent: a lookup hashes bytes, not three UUIDs.
        self._known_products: dict[bytes, _Product] = {}

    def epid_for(self, application: UUID, kms_id: UUID) -> str:
        if (epid := self.identity.overrides.get(kms_id)) is not None:
            return epid
        return self.identity.epids[self.products.csvlk_for(application, kms_id).key]

    def _describe(self, base: BaseRequest) -> _Product:
        db = self.products
        application = product_uuid(base.application_id)
        kms_id = product_uuid(base.kms_id)
        app = db.applications.get(application)
        return _Product(
            db.product_name(product_uuid(base.sku_id), kms_id, application),
            app.name if app else str(application),
            kms_id in db.kms_items,
            db.csvlk_for(application, kms_id).key,
            kms_id,
        )

    def _product(self, request: KmsRequest) -> _Product:
        product = self._known_products.get(request.product_ids)
        if product is None:
            product = self._describe(request.base)
            if len(self._known_products) >= _MAX_PRODUCTS:
                self._known_products.clear()
            if request.product_ids:
                self._known_products[request.product_ids] = product
        return product

    def check(self, base: BaseRequest, now: float) -> None:
        """Apply the host's policy; raises KmsError with the HRESULT to answer."""
        if base.required_count > MAX_REQUIRED_COUNT:
            raise KmsError(
                HResult.INVALID_DATA,
                f"N-count policy {base.required_count} exceeds {MAX_REQUIRED_COUNT}",
            )
        skew = self.policy.max_clock_skew
        if skew is not None and abs(unix_time(base.request_time) - now) > skew:
            raise KmsError(
                HResult.INVALID_TIMESTAMP,
                f"request time {unix_time(base.request_time) - now:+.0f} s off",
            )
        if self.policy.strict:
            item = self.products.kms_items.get(product_uuid(base.kms_id))
            if item is None:
                raise KmsError(HResult.KMS_ID_MISMATCH, f"unknown KMS ID {guid_text(base.kms_id)}")
            if item.retail or item.preview:
                kind = "retail" if item.retail else "preview"
                raise KmsError(HResult.KMS_ID_MISMATCH, f"{item.name} is a {kind} product")
            if item.application.id != product_uuid(base.application_id):
                raise KmsError(
                    HResult.KMS_ID_MISMATCH,
                    f"{item.name} sent with application {guid_text(base.application_id)}",
                )

    def count(self, base: BaseRequest, now: float, address: str = "") -> int:
        """Check a request against the policy, record it and return the count to report
        (the lab overrides apply here); raises KmsError with the HRESULT to answer."""
        self.check(base, now)
        return self.policy.reported(self.counter.count(base, now, address))

    def answer(self, message: bytes, now: float, address: str = "") -> tuple[bytes, Activation]:
        """Answer one KMS request from `address`; raises KmsError when the answer is an
        HRESULT."""
        return self.respond(decode_request(message, verify=self.policy.verify), now, address)

    def decode(self, message: bytes) -> KmsRequest:
        """The request in `message`; raises KmsError with the HRESULT to answer."""
        return decode_request(message, verify=self.policy.verify)

    def respond(
        self, request: KmsRequest, now: float, address: str = "", rule: Response | None = None
    ) -> tuple[bytes, Activation]:
        """Answer a decoded request, as `rule` says if one applies (a behaviour rule's
        reply fields: count, ePID, HWID, intervals, tamper); raises KmsError when the
        answer is an HRESULT."""
        base = request.base
        try:
            count = self.count(base, now, address)
        except KmsError as exc:
            exc.request = base  # decoded: the refusal can say what was asked for
            raise
        product = self._product(request)
        overrides = self.identity.overrides
        epid = overrides.get(product.kms_id) if overrides else None
        if epid is None:
            epid = self.identity.epids[product.csvlk]
        policy = self.policy
        hwid = self.identity.hwid
        activation_interval = policy.activation_interval
        renewal_interval = policy.renewal_interval
        if rule is not None:
            count = rule.count_for(base.required_count, count)
            epid = rule.epid or epid
            hwid = rule.hwid or hwid
            if rule.activation_interval is not None:
                activation_interval = rule.activation_interval
            if rule.renewal_interval is not None:
                renewal_interval = rule.renewal_interval
        response = BaseResponse(  # positional: cheaper than keywords, per request
            base.major,
            base.minor,
            epid,
            base.client_machine_id,
            base.request_time,
            count,
            activation_interval,
            renewal_interval,
        )
        salt = response_iv = b""
        if request.major == 5:
            salt = self.random(16)
        elif request.major >= 6:
            fresh = self.random(32)
            salt, response_iv = fresh[:16], fresh[16:]
        if rule is not None and rule.tamper in KMS_TAMPER_CHECKS:
            payload = tampered_response(
                request, response, rule.tamper, salt=salt, response_iv=response_iv, hwid=hwid
            )
        else:
            payload = encode_response(
                request, response, salt=salt, response_iv=response_iv, hwid=hwid
            )
        activation = Activation(base, count, epid, product.name, product.application, product.known)
        return payload, activation

    def names(self, base: BaseRequest) -> tuple[str, str]:
        """(application, product) as logs and metrics name them (for a refused request)."""
        product = self._describe(base)
        return product.application, product.name
