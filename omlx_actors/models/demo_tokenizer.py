"""The demo models' tokenizer: a byte-level BPE trained locally, deterministically.

Nothing here touches the network or MLX. `train_demo_tokenizer(vocab_size)` trains a
byte-level BPE (GPT-2 style pre-tokenization) on `DEMO_CORPUS`, a few KB of English and
code written into this module, and pads the vocabulary with `<|reserved_N|>` tokens up to
exactly `vocab_size`, so that every id a random-weight model can sample decodes.
`write_demo_tokenizer(dir, ...)` writes `tokenizer.json`, `tokenizer_config.json` (with a
ChatML chat template that renders tools and emits Qwen/Hermes-style `<tool_call>` JSON,
which mlx-lm recognizes as its `json_tools` parser) and `special_tokens_map.json`.

Token id layout (stable for a given vocab size):

    0..4            special tokens: <|begin_of_text|> <|end_of_text|> <|im_start|> <|im_end|> <|pad|>
    5..260          the 256 byte-level symbols
    261..           BPE merges learned from the corpus (as many as fit / as the corpus yields)
    then            <tool_call> </tool_call> <tool_response> </tool_response>  (not "special":
                    they survive `skip_special_tokens`, as in Qwen)
    then            <|reserved_0|> ... up to vocab_size - 1  (special)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS_TOKEN, EOS_TOKEN, IM_START, IM_END, PAD_TOKEN)
# Tokens that end a generation: the text end and the chat turn end.
STOP_TOKENS: tuple[str, ...] = (EOS_TOKEN, IM_END)
# Single tokens, but ordinary text when decoded (Qwen marks these special=False too).
TOOL_TOKENS: tuple[str, ...] = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
RESERVED_TOKEN = "<|reserved_{}|>"

# ChatML with tools, modeled on Qwen2.5's template. The literals `<tool_call>` and
# `tool_call.name` are what mlx-lm's `_infer_tool_parser` keys on to pick `json_tools`,
# whose parser reads `<tool_call>{"name": ..., "arguments": ...}</tool_call>`.
CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}{{- content -}}"
    "{%- elif content is mapping -%}{{- content.text if content.text is defined else '' -}}"
    "{%- elif content is iterable -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{{- part -}}"
    "{%- elif part is mapping and part.type == 'text' -%}{{- part.text -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- elif content is not none -%}{{- content | string -}}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if messages and messages[0].role == 'system' -%}"
    "{%- set system_message = render_content(messages[0].content) -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set system_message = none -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- if tools -%}"
    "{{- '<|im_start|>system\\n' -}}"
    "{%- if system_message is not none -%}{{- system_message + '\\n\\n' -}}{%- endif -%}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call><|im_end|>\\n\' -}}'
    "{%- elif system_message is not none -%}"
    "{{- '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{{- '<|im_start|>assistant' -}}"
    "{%- set content = render_content(message.content) -%}"
    "{%- if content -%}{{- '\\n' + content -}}{%- endif -%}"
    "{%- if message.tool_calls -%}"
    "{%- for tool_call in message.tool_calls -%}"
    "{%- if tool_call.function is defined -%}{%- set tool_call = tool_call.function -%}{%- endif -%}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' -}}'
    "{%- if tool_call.arguments is string -%}{{- tool_call.arguments -}}"
    "{%- else -%}{{- tool_call.arguments | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- elif message.role == 'tool' -%}"
    "{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + render_content(message.content) + '\\n</tool_response>' -}}"
    "{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}"
    "{{- '<|im_start|>' + message.role + '\\n' + render_content(message.content) + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

# The training text: English prose, Python, shell, JSON and chat-shaped lines. Changing it
# changes every demo tokenizer (and so the cache fingerprint, see `tokenizer_fingerprint`).
DEMO_CORPUS = r'''
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a
single step. The sun rose over the hills, and the morning light spread across the valley
where the river ran quietly toward the sea. People in the small town woke early, opened
their windows, and listened to the birds singing in the trees.

Language models predict the next token from the tokens that came before it. A tokenizer
turns text into a sequence of integers, and a detokenizer turns the integers back into
text. Byte-level byte pair encoding starts from the 256 possible bytes and repeatedly
merges the most frequent adjacent pair into a new symbol, so that any string can be
encoded, even one with characters the training data never contained.

An inference server accepts requests, schedules them in batches, runs the model on an
accelerator, and streams the generated tokens back to each client. The key and value
cache stores the attention state of every sequence, so that each decoding step only has
to process one new token per sequence instead of the whole prompt again. When memory runs
short, the scheduler can pause a request, swap its cache out, and resume it later.

Hello! How can I help you today? I would like to know the weather in Paris, please.
The weather in Paris is sunny with a high of twenty-two degrees. Thank you very much.
You are a helpful assistant. Answer the question as briefly and as clearly as you can.
What is the capital of France? The capital of France is Paris. What is two plus two?
Two plus two is four. Can you write a short poem about the ocean? Of course: the waves
roll in, the waves roll out, the gulls cry high and wheel about.

Once upon a time there was a little robot who wanted to learn how to paint. Every day it
watched the painters in the park, and every night it practiced with a brush held in its
metal hand. After many months, the robot painted a picture of the sunrise, and everyone
who saw it agreed that it was beautiful. The robot was happy, and it kept on painting.

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 11 12 42 100 256 1024 2048 4096 65536 3.14159
2.71828 -1 +1 1e-5 0.02 50% 2024-01-15 12:30:45 v1.2.3 #1 $5.00 x = y * 2 + z / 3

def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


class Request:
    def __init__(self, request_id: str, prompt: list[int], max_tokens: int = 256):
        self.request_id = request_id
        self.prompt = prompt
        self.max_tokens = max_tokens
        self.output: list[int] = []

    def is_finished(self) -> bool:
        return len(self.output) >= self.max_tokens


async def stream_tokens(engine, request):
    async for token in engine.generate(request):
        yield {"id": request.request_id, "token": token, "text": engine.decode([token])}


if __name__ == "__main__":
    import json
    import sys

    data = json.loads(sys.stdin.read())
    print(json.dumps({"result": [x * 2 for x in data["values"]], "ok": True}, indent=2))

for (int i = 0; i < n; i++) { sum += values[i]; }
function add(a, b) { return a + b; }
const items = [1, 2, 3].map((x) => x * x);
SELECT name, count(*) FROM users WHERE active = true GROUP BY name ORDER BY name;

$ pip install numpy && python -m pytest -q tests/
$ curl -s http://localhost:8000/v1/chat/completions -H "Content-Type: application/json"
$ git status && git diff --stat && ls -la ~/.cache

{"name": "get_weather", "arguments": {"location": "Paris", "unit": "celsius"}}
{"type": "function", "function": {"name": "search", "description": "Search the web.",
 "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
 "required": ["query"]}}}
{"role": "user", "content": "What time is it?"}
{"role": "assistant", "content": "It is half past three in the afternoon."}
{"role": "tool", "content": "{\"temperature\": 21, \"condition\": \"sunny\"}"}

Questions, answers, lists, and notes:
- First, read the documentation carefully.
- Second, write a small test that shows the problem.
- Third, fix the bug, run the tests again, and make sure everything passes.
Note: the configuration file sets the model path, the port, and the maximum batch size.
Warning: this model has random weights; its output is meaningless and for demos only.
Error: connection refused. Retrying in five seconds. Done. Success. Failed. Timeout.

In the beginning, the library was quiet. Rows of old books stood on tall wooden shelves,
and the air smelled of paper and dust. A student sat by the window, reading about the
history of mathematics: how the Babylonians counted in sixties, how the Greeks proved
theorems about triangles and circles, and how zero traveled from India to the rest of
the world. She wrote notes in a small blue notebook and smiled whenever an idea clicked.
'''


def tokenizer_fingerprint() -> str:
    """A hash of everything that determines the tokenizer besides the vocab size."""
    import tokenizers

    h = hashlib.sha256()
    for part in (
        DEMO_CORPUS,
        CHAT_TEMPLATE,
        "\0".join(SPECIAL_TOKENS),
        "\0".join(TOOL_TOKENS),
        RESERVED_TOKEN,
        tokenizers.__version__,
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def _corpus_chunks() -> list[str]:
    # Paragraphs as separate "documents" (the trainer only counts words, order-free).
    return [p for p in DEMO_CORPUS.split("\n\n") if p.strip()]


def train_demo_tokenizer(vocab_size: int):
    """Train the byte-level BPE and pad it to exactly `vocab_size` ids.

    Returns a `tokenizers.Tokenizer`. Deterministic: same `vocab_size` -> same JSON.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    n_fixed = len(SPECIAL_TOKENS) + len(TOOL_TOKENS)
    if vocab_size < len(alphabet) + n_fixed:
        raise ValueError(
            f"vocab_size {vocab_size} too small: need at least {len(alphabet) + n_fixed} "
            "(256 bytes + special and tool tokens)"
        )

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = BpeTrainer(
        # The trainer counts its special tokens in vocab_size; the tool tokens come after.
        vocab_size=vocab_size - len(TOOL_TOKENS),
        min_frequency=2,
        show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
        initial_alphabet=sorted(alphabet),
    )
    tok.train_from_iterator(_corpus_chunks(), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    n_reserved = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if n_reserved > 0:
        tok.add_special_tokens(
            [
                AddedToken(RESERVED_TOKEN.format(i), special=True, normalized=False)
                for i in range(n_reserved)
            ]
        )
    got = tok.get_vocab_size(with_added_tokens=True)
    if got != vocab_size:  # pragma: no cover - a tokenizers behavior change
        raise RuntimeError(f"demo tokenizer has {got} ids, wanted {vocab_size}")
    return tok


def reserved_token_ids(tok) -> list[int]:
    """Ids of the `<|reserved_N|>` padding tokens of a trained demo tokenizer."""
    prefix = RESERVED_TOKEN.split("{}")[0]
    return sorted(i for t, i in tok.get_vocab(with_added_tokens=True).items() if t.startswith(prefix))


def greedy_suppressed_ids(tok) -> list[int]:
    """Ids a random-weight demo model should never pick greedily, to keep its text readable.

    The builder zeroes these rows of `lm_head`, so they score exactly 0 while the rest score
    ~N(0, s): argmax always lands elsewhere. They are the reserved padding, the special
    tokens other than the stop tokens, the tool-call markers (a random model "calling a tool"
    would only produce unparsable calls), and byte tokens that do not decode to printable
    text on their own (control bytes, lone UTF-8 continuation/lead bytes).
    """
    vocab = tok.get_vocab(with_added_tokens=True)
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    out = []
    for token, i in vocab.items():
        if token in added:
            if token not in STOP_TOKENS:
                out.append(i)
            continue
        text = tok.decode([i], skip_special_tokens=False)
        if not text or "\ufffd" in text or not all(c.isprintable() or c in "\n\t" for c in text):
            out.append(i)
    return sorted(out)


def write_demo_tokenizer(
    dest: Path, vocab_size: int, *, model_max_length: int = 4096
) -> dict[str, Any]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to `dest`.

    Returns a summary: the ids of the special/stop tokens, the reserved ids, and the ids
    `greedy_suppressed_ids` names.
    """
    dest = Path(dest)
    tok = train_demo_tokenizer(vocab_size)
    tok.save(str(dest / "tokenizer.json"), pretty=True)

    ids = {t: tok.token_to_id(t) for t in (*SPECIAL_TOKENS, *TOOL_TOKENS)}
    added = {}
    for t in SPECIAL_TOKENS:
        added[str(ids[t])] = _added_token_entry(t, special=True)
    for t in TOOL_TOKENS:
        added[str(ids[t])] = _added_token_entry(t, special=False)
    # (The reserved tokens are listed in tokenizer.json; no need to repeat 30k of them here.)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "padding_side": "left",
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(
        dest / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    return {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_ids": [ids[t] for t in STOP_TOKENS],
        "pad_token_id": ids[PAD_TOKEN],
        "reserved_ids": reserved_token_ids(tok),
        "suppressed_ids": greedy_suppressed_ids(tok),
        "learned_vocab": vocab_size - len(reserved_token_ids(tok)),
    }


def _added_token_entry(content: str, *, special: bool) -> dict[str, Any]:
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
