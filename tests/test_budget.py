import pytest

from edgemoe.budget import AUTO, Budget, format_bytes, parse_budget
from edgemoe.errors import BudgetParseError, EdgemoeError


@pytest.mark.parametrize("text, expected", [
    ("800MiB", Budget(bytes=800 << 20)),
    ("1.5GiB", Budget(bytes=3 << 29)),
    ("1G", Budget(bytes=1 << 30)),
    ("512M", Budget(bytes=512 << 20)),
    ("512m", Budget(bytes=512 << 20)),
    ("64K", Budget(bytes=64 << 10)),
    ("2GB", Budget(bytes=2 * 10**9)),
    ("1MB", Budget(bytes=10**6)),
    ("4096", Budget(bytes=4096)),
    ("4096B", Budget(bytes=4096)),
    (" 100 MiB ", Budget(bytes=100 << 20)),
    ("25%", Budget(fraction=0.25)),
    ("100%", Budget(fraction=1.0)),
    ("12.5%", Budget(fraction=0.125)),
    (123456, Budget(bytes=123456)),
])
def test_parses(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text", ["off", "OFF", "none", None])
def test_off(text):
    assert parse_budget(text) is None


@pytest.mark.parametrize("text", ["", "lots", "12XB", "-5", "0", "0%", "101%", "-3%", "1.5", "1.5B",
                                  "MiB", "25 %%", "1e9", 0, -1, 1.5, True, [1]])
def test_rejects_junk(text):
    with pytest.raises(BudgetParseError) as info:
        parse_budget(text)
    # a ValueError too, so generic callers can catch it; one line for the CLI
    assert isinstance(info.value, ValueError) and isinstance(info.value, EdgemoeError)
    assert "\n" not in str(info.value)


def test_auto():
    assert parse_budget("auto") is AUTO and parse_budget(" AUTO ") is AUTO and parse_budget(AUTO) is AUTO
    assert AUTO.auto and AUTO.bytes is None and AUTO.fraction is None and str(AUTO) == "auto"
    assert not Budget(bytes=1).auto


def test_budget_passes_through():
    b = Budget(fraction=0.5)
    assert parse_budget(b) is b


def test_format_bytes():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 << 20) == "3.0 MiB"
    assert str(Budget(fraction=0.25)) == "25%"
