"""Every engine message is plain data and survives the wire unchanged (process boundary)."""

from typing import Union

import pytest

from omlx_actors.engine import messages as m
from omlx_actors.kernel import assert_plain_data, decode, encode
from omlx_actors.ssd.blockfile import TensorData

EXAMPLES = [
    m.SamplingParams(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, seed=7,
                     repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=-0.5,
                     logit_bias=((5, -100.0), (9, 2.5)), logprobs=True, top_logprobs=3),
    m.Submit(request_id="r1", prompt_tokens=(1, 2, 3), max_tokens=16,
             sampling=m.SamplingParams(seed=1, temperature=1.0), stop_token_ids=(2,),
             cached_blocks=("ab" * 16,), cache_scope="agent-7"),
    m.Abort(request_id="r1"),
    m.Ping(),
    m.EngineStatsQuery(),
    m.InjectFault(error="boom"),
    m.Pong(steps=3, last_step_age=None, running=1, waiting=0),
    m.Pong(steps=3, last_step_age=0.25, running=1, waiting=2),
    m.EngineStats(steps=1, running=2, waiting=3, prompt_tokens_processed=4, generation_tokens=5,
                  buffer_cache_clears=6, active_memory_bytes=7, cache_memory_bytes=8,
                  peak_memory_bytes=9),
    m.EngineInfo(model_path="/x", model_type="llama", vocab_size=512, max_context=None,
                 eos_token_ids=(1, 3), device="cpu"),
    m.Admitted(request_id="r", queued_s=0.5),
    m.PrefillProgress(request_id="r", done=512, total=2048),
    m.TokenLogprob(token=3, logprob=-0.25),
    m.TokenChoice(token=8, logprob=-0.1, top=()),
    m.TokenDelta(request_id="r", step=9, tokens=(
        m.TokenChoice(token=4),
        m.TokenChoice(token=5, logprob=-1.5, top=(m.TokenLogprob(token=5, logprob=-1.5),)),
    )),
    m.Finished(request_id="r", reason=m.FinishReason.LENGTH, prompt_tokens=3,
               completion_tokens=4, step=12),
    m.Finished(request_id="r", reason=m.FinishReason.ERROR, prompt_tokens=3,
               completion_tokens=0, error="oom", error_type="MemoryError"),
    m.InjectFault(error="x", at_step=4, above_bytes=1 << 20),
    m.RestoredBlock(hash="ab" * 16, parent=None, tensors=(
        TensorData(name="l0.k", dtype="float32", shape=(1, 2), data=b"\x00" * 8),)),
    m.RestoreBlocks(blocks=(m.RestoredBlock(hash="cd" * 16, parent="ab" * 16, tensors=()),)),
]

AnyMessage = Union[tuple(m.ALL_MESSAGE_TYPES)]


def test_every_message_type_has_an_example():
    assert {type(e) for e in EXAMPLES} == set(m.ALL_MESSAGE_TYPES)


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda e: type(e).__name__)
def test_engine_message_round_trips_through_the_wire(message):
    assert_plain_data(message)
    assert decode(encode(message), AnyMessage) == message
