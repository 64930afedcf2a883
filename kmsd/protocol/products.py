"""The product database (products.json beside this file): applications, KMS IDs, SKUs, host keys.

The host keys its decisions on the KMS counted ID (PROTOCOL.md §9.1); SKU names only serve
logs and the client's product choice.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from uuid import UUID


@dataclass(frozen=True, slots=True)
class Csvlk:
    """A host key family: what the ePID of the host that answers it is made of."""

    key: str
    name: str
    group_id: int
    key_id_min: int
    key_id_max: int
    released: dt.date
    host_build: int


@dataclass(frozen=True, slots=True)
class Application:
    id: UUID
    name: str
    csvlk: Csvlk


@dataclass(frozen=True, slots=True)
class KmsItem:
    """A KMS counted ID (CSVLK group)."""

    id: UUID
    name: str
    application: Application
    n_policy: int
    protocol: int
    csvlk: Csvlk
    retail: bool
    preview: bool


@dataclass(frozen=True, slots=True)
class Sku:
    id: UUID
    name: str
    kms: KmsItem


class ProductDatabase:
    def __init__(self, data: dict[str, Any]) -> None:
        raw = data
        self.csvlks: dict[str, Csvlk] = {
            c["key"]: Csvlk(
                c["key"],
                c["name"],
                c["group_id"],
                c["key_id_min"],
                c["key_id_max"],
                dt.date.fromisoformat(c["released"]),
                c["host_build"],
            )
            for c in _rows(raw, "csvlks")
        }
        self.applications: dict[UUID, Application] = {
            UUID(a["id"]): Application(UUID(a["id"]), a["name"], self.csvlks[a["csvlk"]])
            for a in _rows(raw, "applications")
        }
        self.kms_items: dict[UUID, KmsItem] = {
            UUID(k["id"]): KmsItem(
                UUID(k["id"]),
                k["name"],
                self.applications[UUID(k["app"])],
                k["n_policy"],
                k["protocol"],
                self.csvlks[k["csvlk"]],
                k["retail"],
                k["preview"],
            )
            for k in _rows(raw, "kms_ids")
        }
        self.skus: dict[UUID, Sku] = {
            UUID(s["id"]): Sku(UUID(s["id"]), s["name"], self.kms_items[UUID(s["kms_id"])])
            for s in _rows(raw, "skus")
        }
        self._by_name = {s.name.casefold(): s for s in self.skus.values()}

    def sku_by_name(self, name: str) -> Sku | None:
        return self._by_name.get(name.casefold())

    def csvlk_for(self, application_id: UUID, kms_id: UUID) -> Csvlk:
        """The host key that answers a KMS ID; for an unknown one, the application's default."""
        item = self.kms_items.get(kms_id)
        if item is not None:
            return item.csvlk
        app = self.applications.get(application_id)
        return app.csvlk if app is not None else self.csvlks["windows"]

    def product_name(self, sku_id: UUID, kms_id: UUID, application_id: UUID) -> str:
        """The most precise name known: SKU, else KMS group, else application, else the GUID."""
        if (sku := self.skus.get(sku_id)) is not None:
            return sku.name
        if (item := self.kms_items.get(kms_id)) is not None:
            return f"unknown SKU {sku_id} of {item.name}"
        if (app := self.applications.get(application_id)) is not None:
            return f"unknown SKU {sku_id} of {app.name}"
        return f"unknown SKU {sku_id}"


def _rows(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = raw[key]
    return rows


@cache
def products() -> ProductDatabase:
    """The database shipped with the package, loaded once."""
    text = Path(__file__).with_name("products.json").read_text("utf-8")
    return ProductDatabase(json.loads(text))
