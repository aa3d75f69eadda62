"""Stop strings and tool-call extraction on plain text, in arbitrary splits."""

import tracemalloc

from hypothesis import given
from hypothesis import strategies as st
from mlx_lm.tool_parsers import json_tools

from omlx_actors.front.text import StopStringMatcher, ToolCallScanner


def _feed_all(matcher, pieces):
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_string_split_across_pieces_is_found_and_nothing_after_it_leaks():
    text, stopped = _feed_all(StopStringMatcher(("STOP",)), ["hello S", "T", "OP and more"])
    assert (text, stopped) == ("hello ", True)


def test_text_that_only_looks_like_a_stop_prefix_is_released_at_the_end():
    text, stopped = _feed_all(StopStringMatcher(("STOP",)), ["hello S", "TO"])
    assert (text, stopped) == ("hello STO", False)


def test_earliest_of_several_stop_strings_wins():
    text, stopped = _feed_all(StopStringMatcher(("b", "xyz")), ["axyzb"])
    assert (text, stopped) == ("a", True)


@given(st.text(alphabet="abcS TOP", max_size=40), st.lists(st.integers(0, 40), max_size=8))
def test_any_split_gives_the_same_result_as_the_whole_text(text, cuts):
    cuts = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    expected_index = text.find("STOP")
    expected = (text[:expected_index], True) if expected_index >= 0 else (text, False)
    assert _feed_all(StopStringMatcher(("STOP",)), pieces) == expected


def _scanner():
    return ToolCallScanner(start=json_tools.tool_call_start, end=json_tools.tool_call_end,
                           parse=json_tools.parse_tool_call)


def test_tool_call_split_across_pieces_is_parsed_with_mlx_lm_parser():
    scanner = _scanner()
    pieces = ["Sure. <tool", '_call>{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}',
              "</tool_call> done"]
    texts, calls = [], []
    for piece in pieces:
        text, new_calls = scanner.feed(piece)
        texts.append(text)
        calls += new_calls
    texts.append(scanner.flush())
    assert "".join(texts) == "Sure.  done"
    assert [(c.name, c.arguments, c.index) for c in calls] == [
        ("get_weather", '{"city": "Oslo"}', 0)
    ]


def test_malformed_tool_call_is_kept_as_text_not_lost():
    scanner = _scanner()
    text, calls = scanner.feed("<tool_call>not json</tool_call>")
    assert calls == []
    assert text == "<tool_call>not json</tool_call>"


def test_unterminated_tool_call_is_flushed_as_text():
    scanner = _scanner()
    text, calls = scanner.feed('x<tool_call>{"name": "f"')
    assert (text, calls) == ("x", [])
    assert scanner.flush() == '<tool_call>{"name": "f"'


STOPS = ("ab", "bab", "cbc", "c")


def _may_start_a_stop(text: str) -> int:
    """The reference: length of the longest end of `text` that begins some stop string."""
    return max((n for s in STOPS for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@given(st.lists(st.text(alphabet="abcx", max_size=6), max_size=10))
def test_several_stop_strings_release_text_as_soon_as_it_cannot_start_one(pieces):
    matcher = StopStringMatcher(STOPS)
    released, seen = "", ""
    for piece in pieces:
        seen += piece
        text, stopped = matcher.feed(piece)
        released += text
        if stopped:
            first = min((seen.find(s), s) for s in STOPS if s in seen)
            assert (released, matcher.matched) == (seen[: first[0]], first[1])
            return
        assert released == seen[: len(seen) - _may_start_a_stop(seen)]
    assert released + matcher.flush() == seen


def test_a_partial_tool_call_start_is_held_back_until_it_is_not_one():
    scanner = _scanner()
    assert scanner.feed("a <tool_ca") == ("a ", [])
    assert scanner.feed("t") == ("<tool_cat", [])


def test_a_long_stop_string_is_matched_in_linear_memory():
    # Regression: every proper prefix of each stop string was materialized, so a 20,001-char
    # stop string cost ~200 MB (a 5 MB one, 23 GB) before the first token.
    stop = "ab" * 10_000 + "c"
    tracemalloc.start()
    try:
        matcher = StopStringMatcher((stop,))
        text, stopped = _feed_all(matcher, ["ab"] * 15_000 + ["c", "tail"])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (text, stopped, matcher.matched) == ("ab" * 5_000, True, stop)
    assert peak < 2_000_000, peak


@given(st.lists(st.sampled_from(["abcd", "bc", "d", "cdx", "bcdbc"]), min_size=1, max_size=3, unique=True),
       st.text(alphabet="abcdx", max_size=30), st.lists(st.integers(0, 30), max_size=6))
def test_the_stop_that_ends_first_wins_however_the_text_is_split(stops, text, cuts):
    cuts = sorted({min(c, len(text)) for c in cuts})
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    # The reference: the earliest end of any stop string (a stop's first occurrence ends
    # first), the longest stop among those ending there.
    first = min(((text.find(s) + len(s), -len(s), s) for s in stops if s in text), default=None)
    matcher = StopStringMatcher(tuple(stops))
    got = _feed_all(matcher, pieces)
    if first is None:
        assert got == (text, False)
    else:
        assert got == (text[: first[0] + first[1]], True)
        assert matcher.matched == first[2]
