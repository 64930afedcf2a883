"""The product database (products.json beside this file): applications, KMS IDs, SKUs, host keys.

The host keys its decisions on the KMS counted ID (docs/protocol.md, "Counting"); SKU names
only serve logs and the choice of a product by name.

Names are found as people type them (`find_sku`, `find_kms_item`, `find_application`): case,
spacing and punctuation do not matter, a Windows 10/11 SKU answers to "Windows 10 ..." and
"Windows 11 ..." (and "LTSC 2019/2021/2024" to each year), a server to "Server 2022 ...", an
Office LTSC SKU to its name without "LTSC", words in any order. A name that fits several
products is refused with their list, an unknown one with the closest names.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar
from uuid import UUID

T = TypeVar("T")


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


class ProductNameError(ValueError):
    """A product or application name that matches nothing, or several (the message says which)."""


def normalize(name: str) -> str:
    """Lower case, words only: "Windows  10/11 Pro (Preview)" -> "windows 10/11 pro preview"."""
    words = re.findall(r"[\w.+/-]+", name.casefold())
    if words[:1] == ["microsoft"]:
        words = words[1:]
    return " ".join(words)


def sku_aliases(name: str) -> set[str]:
    """The normalized names a SKU answers to (see the module's docstring)."""
    names = {normalize(name)}
    for word in normalize(name).split():  # "10/11", "2019/2021/2024": each one alone too
        if "/" in word:
            names |= {a.replace(word, part) for a in names for part in word.split("/")}
    for alias in list(names):
        if alias.startswith("windows server "):
            names.add(alias.removeprefix("windows "))
        if alias.split()[:1] in (["office"], ["visio"]) and " ltsc " in f" {alias} ":
            names.add(" ".join(word for word in alias.split() if word != "ltsc"))
    return names


class _Names(Generic[T]):
    """Look-up of things by normalized names: exact, then the same words in any order, then
    the things whose names contain all the words typed."""

    def __init__(self, kind: str, named: dict[str, set[str]], shown: dict[str, T]) -> None:
        self.kind = kind
        self.shown = shown  # display name -> thing
        self.exact: dict[str, set[str]] = {}  # normalized alias -> display names
        self.words: dict[frozenset[str], set[str]] = {}
        for display, aliases in named.items():
            for alias in aliases:
                self.exact.setdefault(alias, set()).add(display)
                self.words.setdefault(frozenset(alias.split()), set()).add(display)

    def find(self, text: str) -> T:
        key = normalize(text)
        words = frozenset(key.split())
        found = self.exact.get(key) or self.words.get(words)
        if not found and words:
            found = {d for ws, ds in self.words.items() if words <= ws for d in ds}
        if found and len(found) == 1:
            return self.shown[next(iter(found))]
        if found:
            names = sorted(found)
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            raise ProductNameError(
                f"{text!r} matches {len(names)} {self.kind}s: {', '.join(names[:8])}{more}"
            )
        import difflib  # only for a name that matches nothing

        close = difflib.get_close_matches(key, self.exact, n=6, cutoff=0.6)
        names = list(dict.fromkeys(sorted(self.exact[c])[0] for c in close))[:3]
        hint = f"; closest: {', '.join(names)}" if names else ""
        raise ProductNameError(f"unknown {self.kind} {text!r}{hint}")


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
        self._app_aliases = {
            a.name: row.get("aliases", [])
            for a, row in zip(self.applications.values(), _rows(raw, "applications"), strict=True)
        }
        self._by_name = {s.name: s for s in self.skus.values()}

    # The indexes of names as people type them are built at their first use: a daemon that
    # is never asked for a name (most are) does not keep them in memory.

    @cached_property
    def _sku_names(self) -> _Names[Sku]:
        return _Names(
            "product",
            {s.name: sku_aliases(s.name) for s in self.skus.values()},
            {s.name: s for s in self.skus.values()},
        )

    @cached_property
    def _app_names(self) -> _Names[Application]:
        return _Names(
            "application",
            {
                a.name: {normalize(a.name), *map(normalize, self._app_aliases[a.name])}
                for a in self.applications.values()
            },
            {a.name: a for a in self.applications.values()},
        )

    @cached_property
    def _kms_names(self) -> dict[str, KmsItem]:
        return {normalize(k.name): k for k in self.kms_items.values()}

    def sku_by_name(self, name: str) -> Sku | None:
        """A SKU by its exact name, for code; people's names go through find_sku."""
        return self._by_name.get(name)

    def find_sku(self, text: str) -> Sku:
        """A SKU by its SKU ID or by name as people type it; ProductNameError otherwise."""
        if (uuid := _uuid(text)) is not None and (sku := self.skus.get(uuid)) is not None:
            return sku
        return self._sku_names.find(text)

    def find_kms_item(self, text: str) -> KmsItem:
        """A KMS counted ID by GUID, KMS group name (exact) or any SKU name of the group."""
        if (uuid := _uuid(text)) is not None:
            if (item := self.kms_items.get(uuid)) is not None:
                return item
            if (sku := self.skus.get(uuid)) is not None:
                return sku.kms
        if (item := self._kms_names.get(normalize(text))) is not None:
            return item
        return self.find_sku(text).kms

    def find_application(self, text: str) -> Application:
        """An application by GUID or name ("Windows", "Office 2013+"); ProductNameError."""
        uuid = _uuid(text)
        if uuid is not None and (app := self.applications.get(uuid)) is not None:
            return app
        return self._app_names.find(text)

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


def _uuid(text: str) -> UUID | None:
    try:
        return UUID(text.strip())
    except ValueError:
        return None


def _rows(raw: dict[str, Any], key: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = raw[key]
    return rows


@cache
def products() -> ProductDatabase:
    """The database shipped with the package, loaded once."""
    text = Path(__file__).with_name("products.json").read_text("utf-8")
    return ProductDatabase(json.loads(text))
