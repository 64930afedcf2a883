"""Products and applications named as people type them, the same everywhere a name is taken:
kmsclient --product, kmsd --epid NAME=, scenario files, kmsd clients/reset --app."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsclient import cli
from kmsclient.sim.scenario import ScenarioError, from_dict
from kmsd.config import parse_epid_override
from kmsd.protocol.products import ProductNameError, products, sku_aliases
from kmsd.store import StoreError, resolve_app

DB = products()
EPID = "03612-00206-556-123727-03-1033-17763.0000-2972018"


@pytest.mark.parametrize(
    ("typed", "name"),
    [
        ("Windows 10 Enterprise", "Windows 10/11 Enterprise"),
        ("Windows 11 Enterprise", "Windows 10/11 Enterprise"),
        ("Windows 11 Pro", "Windows 10/11 Pro"),
        ("windows 11 pro", "Windows 10/11 Pro"),
        ("  WINDOWS   11  Pro ", "Windows 10/11 Pro"),
        ("Microsoft Windows 10 Pro", "Windows 10/11 Pro"),
        ("Windows 10/11 Enterprise", "Windows 10/11 Enterprise"),
        ("Server 2022 Datacenter", "Windows Server 2022 Datacenter"),
        ("windows server 2019 standard", "Windows Server 2019 Standard"),
        ("Office Professional Plus 2021", "Office LTSC Professional Plus 2021"),
        ("Office 2021 Professional Plus", "Office LTSC Professional Plus 2021"),
        ("Windows 11 Enterprise LTSC 2024", "Windows 10/11 Enterprise LTSC 2019/2021/2024"),
        ("Windows 11 SE", "Windows 11 SE"),
        ("server 2022 datacenter azure edition", "Windows Server 2022 Datacenter: Azure Edition"),
        ("73111121-5638-40f6-bc11-f1d7b0d64300", "Windows 10/11 Enterprise"),
    ],
)  # fmt: skip
def test_names_people_type(typed: str, name: str) -> None:
    assert DB.find_sku(typed).name == name


def test_an_ambiguous_name_lists_its_candidates() -> None:
    with pytest.raises(ProductNameError) as caught:
        DB.find_sku("Office 2021")
    assert str(caught.value) == (
        "'Office 2021' matches 3 products: Office LTSC Professional Plus 2021, "
        "Office LTSC Standard 2021, Office Professional Plus 2021 (Preview)"
    )
    with pytest.raises(ProductNameError, match=r"'Pro' matches 25 products: .* and 17 more$"):
        DB.find_sku("Pro")


def test_a_miss_names_the_closest() -> None:
    with pytest.raises(ProductNameError) as caught:
        DB.find_sku("Windos 10 Enterprize")
    assert str(caught.value) == (
        "unknown product 'Windos 10 Enterprize'; closest: Windows 10/11 Enterprise, "
        "Windows 10/11 Enterprise N, Windows 10/11 Enterprise G"
    )
    with pytest.raises(ProductNameError, match=r"^unknown product 'xyz'$"):
        DB.find_sku("xyz")


def test_aliases_never_collide() -> None:
    """Every alias names exactly one SKU, so an exact alias is never ambiguous."""
    owners: dict[str, str] = {}
    for sku in DB.skus.values():
        for alias in sku_aliases(sku.name):
            assert owners.setdefault(alias, sku.name) == sku.name, alias


def _retyped(name: str, cases: list[bool], spaces: list[int]) -> str:
    typed = [
        (word.upper() if cases[i % len(cases)] else word.lower()) + " " * spaces[i % len(spaces)]
        for i, word in enumerate(name.split())
    ]
    return " ".join(typed)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(DB._by_name)),
    st.lists(st.booleans(), min_size=1, max_size=4),
    st.lists(st.integers(0, 3), min_size=1, max_size=4),
)
def test_any_case_and_spacing_of_a_listed_name(
    name: str, cases: list[bool], spaces: list[int]
) -> None:
    assert DB.find_sku(_retyped(name, cases, spaces)).name == name


@pytest.mark.parametrize(
    ("typed", "name"),
    [
        ("Office 2013+", "Office 2013 and later"),
        ("office 2013 and later", "Office 2013 and later"),
        ("WINDOWS", "Windows"),
        ("Office 2010", "Office 2010"),
    ],
)
def test_application_names(typed: str, name: str) -> None:
    assert DB.find_application(typed).name == name
    assert resolve_app(typed) == str(DB.find_application(name).id)


def test_application_misses() -> None:
    with pytest.raises(ProductNameError, match="'office' matches 2 applications"):
        DB.find_application("office")
    with pytest.raises(StoreError, match="unknown application 'Ofice 2013'; closest: Office 2013"):
        resolve_app("Ofice 2013")


def test_epid_override_takes_the_same_names() -> None:
    win = DB.sku_by_name("Windows 10/11 Enterprise")
    assert win is not None
    assert parse_epid_override(f"Windows 11 Pro={EPID}") == (win.kms.id, EPID)
    assert parse_epid_override(f"windows 10/11 (volume)={EPID}") == (win.kms.id, EPID)
    with pytest.raises(ValueError, match="'Office 2021' matches 3 products"):
        parse_epid_override(f"Office 2021={EPID}")


def test_scenario_files_take_the_same_names() -> None:
    scenario = from_dict({"groups": [{"name": "w", "product": "Windows 11 Pro", "count": 1}]})
    assert scenario.groups[0].sku.name == "Windows 10/11 Pro"
    with pytest.raises(ScenarioError, match=r"groups\[0\]\.product: unknown product 'Widnows"):
        from_dict({"groups": [{"name": "w", "product": "Widnows 11 Pro", "count": 1}]})


@pytest.mark.system
def test_kmsclient_product_errors_take_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kmsclient", "activate", "127.0.0.1:9", "--product", "Office 2021"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "kmsclient activate: error: 'Office 2021' matches 3 products: Office LTSC Professional "
        "Plus 2021, Office LTSC Standard 2021, Office Professional Plus 2021 (Preview)"
    ]


def test_kmsclient_list_products_still_works() -> None:
    out = io.StringIO()
    assert cli.main(["activate", "--list-products"], out) == 0
    assert "Windows 10/11 Enterprise" in out.getvalue()
