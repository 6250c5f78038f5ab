import pytest

from nb_offload import BudgetError, OffloadError, format_size, parse_size


@pytest.mark.parametrize("text,expected", [
    ("6GiB", 6 * 2**30), ("6 GB", 6 * 10**9), ("500MiB", 500 * 2**20), ("1.5G", int(1.5 * 2**30)),
    ("123", 123), (4096, 4096), ("2 tib", 2 * 2**40), ("10kb", 10_000), ("0", 0),
])
def test_sizes_parse(text, expected):
    assert parse_size(text) == expected


def test_percent_is_of_capacity():
    assert parse_size("80%", capacity=1000) == 800
    assert parse_size(" 12.5 % ", capacity=800) == 100


@pytest.mark.parametrize("bad,fragment", [
    ("abc", "'abc' is not a size"), ("-1GiB", "'-1GiB' is negative"), ("6 parsecs", "'6 parsecs' is not a size"),
    ("", "is not a size"), (-5, "negative"), ([1], "is not a size"), (True, "is not a size"),
    ("150%", "more than 100%"), ("1e3GB", "is not a size"),
])
def test_bad_sizes_name_value_and_accepted_form(bad, fragment):
    with pytest.raises(BudgetError) as info:
        parse_size(bad, capacity=100, what="gpu")
    msg = str(info.value)
    assert fragment in msg
    assert "GiB" in msg or "100%" in msg
    assert isinstance(info.value, OffloadError)


def test_percent_without_capacity():
    with pytest.raises(BudgetError, match="percentage needs a known capacity"):
        parse_size("50%", what="gpu")


def test_format_size():
    assert format_size(0) == "0 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(6 * 2**30) == "6.0 GiB"
    assert format_size(250 * 2**20) == "250 MiB"
