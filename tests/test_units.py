"""The one size parser and the one percentile, on plain data."""

import pytest

from omlx_actors.units import parse_bytes, percentile


@pytest.mark.parametrize(("text", "expected"), [
    ("123", 123), ("512M", 512 * 2**20), ("1.5G", int(1.5 * 2**30)), ("12GiB", 12 * 2**30),
    ("64kb", 64 * 1024), (" 2T ", 2 * 2**40),
])
def test_sizes_read_in_binary_units(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-5M", "5X", "1.2.3G"])
def test_what_is_not_a_size_is_refused(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes(text)


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
