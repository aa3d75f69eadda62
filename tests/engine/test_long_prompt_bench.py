"""`bench-long-prompt`'s bookkeeping, on plain data: which gaps count as before the long prompt
arrived and which as during its prefill."""

from omlx_actors.bench.long_prompt import Trace, itl_split, summarize


def test_gaps_are_filed_by_when_the_later_token_came_and_each_streams_first_gap_is_left_out():
    trace = Trace(stream_times=((0.0, 5.0, 5.1, 5.2, 5.3, 7.3, 7.4, 9.0),
                                (0.0, 5.0, 5.2, 5.4, 6.4, 7.5)),
                  long_at=5.35, long_first=7.4)
    before, during = itl_split(trace)
    assert sorted(round(g, 3) for g in before) == [0.1, 0.1, 0.1, 0.2]
    assert sorted(round(g, 3) for g in during) == [0.1, 0.2, 1.0, 2.0]  # 7.5, 9.0: after
    result = summarize("x", [trace])
    assert round(result.itl_p50_before_s, 3) == 0.1 and result.gaps_during == 4
    assert round(result.long_ttft_s, 3) == 2.05
