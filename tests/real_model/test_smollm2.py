"""A trained model through the runtime: SmolLM2-135M-Instruct, imported from its GGUF.

Greedy answers are checked for the right word; the chat template and the stop token come
from the GGUF; stop ids are honoured wherever the model's files name them; streaming,
the prefix cache and batching never change a greedy answer; the tokenizer round-trips.
The model runs as the CPU backend serves it (float32), with short `max_tokens`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import trio
from http_support import openai_client, serve

from omlx_actors.wiring import open_runtime
from omlx_actors.models.gguf import read_gguf_header

QUESTION = "What is the capital of France? Answer in one sentence."
FACTS = [
    ("What is the capital of France? Answer in one sentence.", "Paris"),
    ("What is the capital of Japan? Answer in one sentence.", "Tokyo"),
    ("What is the capital of Italy? Answer in one sentence.", "Rome"),
    ("What is the opposite of hot? Answer in one word.", "cold"),
    ("What color is the sky on a clear day? Answer in one word.", "blue"),
    ("Who wrote Romeo and Juliet? Answer in one sentence.", "Shakespeare"),
]
IM_END = 2


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def test_greedy_answers_to_factual_questions_contain_the_right_word(smollm2):
    # By its served name, as `bench-servers --model smollm2-135m-instruct` or a scenario
    # names it: the same cached float32 import.
    async with open_runtime("smollm2-135m-instruct") as rt:
        assert rt.model_path == smollm2
        answers: dict[str, str] = {}

        async def ask(question: str) -> None:
            text, _, _ = await rt.chat(_user(question), max_tokens=24, temperature=0.0).collect()
            answers[question] = text

        async with trio.open_nursery() as nursery:
            for question, _ in FACTS:
                nursery.start_soon(ask, question)
    for question, word in FACTS:
        assert word.lower() in answers[question].lower(), (question, answers[question])
    assert answers[QUESTION] == "The capital of France is Paris."


async def test_the_chat_template_comes_from_the_gguf(smollm2_gguf, smollm2):
    template = read_gguf_header(smollm2_gguf).metadata["tokenizer.chat_template"]
    config = json.loads((smollm2 / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template
    async with open_runtime(smollm2) as rt:
        session = rt.chat(_user("Hi"), max_tokens=1)
        await session.collect()
        prompt = rt.tokenizer.decode(list(session.prompt_tokens))
    assert prompt == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained "
                      "by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")


def _variant(src: Path, dest: Path, *, config_eos: bool, tokenizer_eos: bool,
             generation_config_eos: bool) -> Path:
    """`src` with `<|im_end|>` named as the stop token only where asked (weights linked)."""
    dest.mkdir()
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.symlink(f, dest / f.name)
        elif f.is_file():
            shutil.copy2(f, dest / f.name)
    config = json.loads((dest / "config.json").read_text())
    config.pop("eos_token_id", None)
    if config_eos:
        config["eos_token_id"] = IM_END
    (dest / "config.json").write_text(json.dumps(config))
    tok = json.loads((dest / "tokenizer_config.json").read_text())
    tok["eos_token"] = "<|im_end|>" if tokenizer_eos else "<|endoftext|>"
    (dest / "tokenizer_config.json").write_text(json.dumps(tok))
    if generation_config_eos:
        (dest / "generation_config.json").write_text(json.dumps({"eos_token_id": IM_END}))
    return dest


@pytest.mark.parametrize("where", ["config", "tokenizer", "generation_config"])
async def test_generation_stops_at_im_end_wherever_the_stop_id_is_named(smollm2, tmp_path, where):
    model = _variant(smollm2, tmp_path / f"smollm2-{where}", config_eos=where == "config",
                     tokenizer_eos=where == "tokenizer",
                     generation_config_eos=where == "generation_config")
    async with open_runtime(model) as rt:
        assert IM_END in rt.info.eos_token_ids
        session = rt.chat(_user(QUESTION), max_tokens=20)
        text, _, done = await session.collect()
    assert done.finish_reason == "stop"
    assert text == "The capital of France is Paris."
    assert session.completion_token_ids[-1] == IM_END
    assert done.usage.completion_tokens == len(session.completion_token_ids) < 20


async def test_streaming_equals_non_streaming_over_http(smollm2):
    async with serve(smollm2) as server:
        client = openai_client(server)
        questions = [q for q, _ in FACTS[:2]]
        for question in questions:
            whole = await client.chat.completions.create(
                model="smollm2-135m-instruct", messages=_user(question), max_tokens=24,
                temperature=0)
            pieces = []
            stream = await client.chat.completions.create(
                model="smollm2-135m-instruct", messages=_user(question), max_tokens=24,
                temperature=0, stream=True)
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    pieces.append(chunk.choices[0].delta.content)
            assert whole.choices[0].finish_reason == "stop"
            assert "".join(pieces) == whole.choices[0].message.content
            assert "<|im_end|>" not in whole.choices[0].message.content
    await client.close()


TURNS = ["Name a fruit that is red.", "What color is a banana?", "And a lemon?",
         "Thanks! Say goodbye in one short sentence."]


async def _conversation(model: Path, **config) -> tuple[list[str], list[int]]:
    """Four turns, each with the previous answers in its history: (answers, cached tokens)."""
    messages: list[dict] = []
    answers, cached = [], []
    async with open_runtime(model, block_size=16, **config) as rt:
        for turn in TURNS:
            messages.append({"role": "user", "content": turn})
            text, _, done = await rt.chat(messages, max_tokens=16, temperature=0.0).collect()
            messages.append({"role": "assistant", "content": text})
            answers.append(text)
            cached.append(done.usage.cached_tokens)
    return answers, cached


async def test_outputs_are_identical_with_the_prefix_cache_on_and_off_over_four_turns(smollm2):
    with_cache, cached = await _conversation(smollm2)
    without_cache, none_cached = await _conversation(smollm2, prefix_cache_bytes=0)
    assert with_cache == without_cache
    assert all(c > 0 for c in cached[1:]), cached  # later turns did reuse their history
    assert none_cached == [0, 0, 0, 0]


async def test_an_answer_alone_equals_the_same_answer_among_sixteen_concurrent(smollm2):
    others = [f"Write one sentence about the number {n}." for n in range(15)]
    # max_tokens 16: the answer ("The capital of France is Paris.") is 8 tokens and stops.
    async with open_runtime(smollm2) as rt:
        alone, _, _ = await rt.chat(_user(QUESTION), max_tokens=16, temperature=0.0).collect()
        results: dict[int, str] = {}

        async def ask(i: int, question: str) -> None:
            results[i] = (await rt.chat(_user(question), max_tokens=16, temperature=0.0).collect())[0]

        async with trio.open_nursery() as nursery:
            for i, question in enumerate([*others[:7], QUESTION, *others[7:]]):
                nursery.start_soon(ask, i, question)
    assert alone == "The capital of France is Paris."
    assert results[7] == alone


CORPUS = [
    "Hello, world! This is plain ASCII text with punctuation: (a), [b], {c}; 1234567890.",
    "  leading spaces, trailing spaces   and\ttabs\nand newlines\n\n",
    "Café, naïve, façade, jalapeño, Ångström, Zürich, São Paulo, œuvre, ĳssel.",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다。",
    "Emoji: 🙂 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ✨🚀",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint(f'{f(3)=}')\n",
    "SELECT name, COUNT(*) FROM users WHERE id <> 0 GROUP BY name; -- ok",
    "<|im_start|>user\nHi<|im_end|>\n",
]


async def test_the_tokenizer_round_trips_text_and_special_tokens_are_single_ids(smollm2):
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(smollm2)
    for text in CORPUS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        detok = tok.detokenizer
        detok.reset()
        for i in ids:
            detok.add_token(i)
        detok.finalize()
        # mlx-lm's BPE streaming detokenizer drops one leading space of a generation, by
        # design (models that add a prefix space); everything else must come back.
        assert detok.text == (text[1:] if text.startswith(" ") else text)
    specials = json.loads((smollm2 / "tokenizer.json").read_text())["added_tokens"]
    assert len(specials) == 17
    for added in specials:
        assert added["special"] is True
        assert tok.encode(added["content"], add_special_tokens=False) == [added["id"]]
    assert tok.encode("<|im_end|>", add_special_tokens=False) == [IM_END]


async def test_a_control_token_the_model_emits_is_never_text(smollm2):
    # logit_bias makes the model emit <|im_start|> (id 1, a special token that is not a
    # stop id) at every step: the answer has those tokens, with their logprobs, but no text.
    async with open_runtime(smollm2) as rt:
        im_start = rt.tokenizer.convert_tokens_to_ids("<|im_start|>")
        assert im_start not in rt.info.eos_token_ids
        session = rt.chat(_user(QUESTION), max_tokens=4, temperature=0.0,
                          logit_bias={im_start: 100.0}, logprobs=True)
        text, _, done = await session.collect()
    assert session.completion_token_ids == [im_start] * 4
    assert text == ""
    assert done.finish_reason == "length"
