"""Chat records, {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}, as
token ids with a loss mask on the assistant's turns.

Rendering: the tokenizer's chat template (tokenizer_config.json's or chat_template.jinja) as
transformers' `apply_chat_template` renders it: jinja2's ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, and the variables `messages`, `add_generation_prompt`, the special
tokens (`bos_token`, `eos_token`, ...: Tokenizer.special_tokens) and `raise_exception`. A
tokenizer without a template renders DEFAULT_TEMPLATE: one "role: content" line per message,
EOS after each assistant message, "assistant: " as the generation prompt; BOS first when the
tokenizer's own convention prepends it (with a template, only the template writes BOS, as in
transformers).

Assistant turns: turn i spans from the end of render(messages[:i], add_generation_prompt=True) to
the end of render(messages[:i + 1]): its content and whatever the template closes the turn with
(its end-of-turn token; EOS with the default). Those targets, and nothing else, count. A template
under which these renderings are not prefixes of the whole conversation's rendering (e.g. one that
drops earlier turns' reasoning) cannot be split so and is refused.

Tokens: the pieces between those offsets are tokenized one at a time, as generation sees them (the
prompt up to the assistant's header alone, then the reply), each special token's text
(Tokenizer.special_tokens: BOS, EOS, padding) becoming its id. These are transformers'
`apply_chat_template(..., tokenize=True)` ids wherever the pieces tokenize as the whole does (a
template that ends headers and turns with special tokens or newlines). Every conversation ends
with EOS (appended when the rendering does not end with it), which counts when the last message is
the assistant's, so fine-tuned models learn to stop.

Bad records (messages not a list, a message without a known role or text content, no assistant
message, a template that raises) are DataError naming the record's `_where`.
"""

import datetime
import functools
import json
import re

import jinja2
import jinja2.ext
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment

from podtrain.data.sources import DataError, locate

ROLES = ("system", "user", "assistant")
FIELD = "messages"
DEFAULT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n"
    "{% if m.role == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def is_chat(record: dict) -> bool:
    return FIELD in record


def messages(record: dict, where: str) -> list[dict]:
    """The record's messages, checked: DataError naming `where` and what is wrong."""
    where = locate(where or "a record")
    msgs = record[FIELD]
    if not isinstance(msgs, list) or not msgs:
        what = "an empty list" if isinstance(msgs, list) else f"a {type(msgs).__name__}"
        raise DataError(f"{where}: field {FIELD!r} holds {what}, not a list of {{role, content}} messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {FIELD}[{i}] is a {type(m).__name__}, not an object with role and content")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: {FIELD}[{i}] has role {m.get('role')!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {FIELD}[{i}] ({m['role']}) has content {m.get('content')!r}, not text")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: no assistant message in {FIELD} (roles: {', '.join(m['role'] for m in msgs)})")
    # transformers drops keys whose value is None before rendering
    return [{k: v for k, v in m.items() if v is not None} for m in msgs]


def text(msgs: list[dict]) -> str:
    """The conversation as the default template writes it, without EOS (a char vocabulary, tokenizer training)."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in msgs)


def render(tok, msgs: list[dict], add_generation_prompt: bool = False, where: str = "") -> str:
    """The conversation rendered with the tokenizer's template (or DEFAULT_TEMPLATE); DataError if it raises."""
    template = tok.chat_template or DEFAULT_TEMPLATE
    try:
        return _compile(template).render(
            messages=msgs, add_generation_prompt=add_generation_prompt, **tok.special_tokens
        )
    except Exception as e:  # a template may raise anything: raise_exception, a TypeError, a sandbox SecurityError
        which = "the tokenizer's chat template" if tok.chat_template else "the default chat template"
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"{locate(where or 'a record')}: {which} failed on this conversation: {reason}") from None


def encode(tok, msgs: list[dict], where: str = "") -> tuple[np.ndarray, np.ndarray, float]:
    """(ids int32, loss mask bool aligned with ids: whether the token counts as a target, UTF-8
    bytes of the assistant messages' content) of checked messages (`messages`); see the module docstring."""
    whole = render(tok, msgs, False, where)
    cuts = [0]
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        start, end = render(tok, msgs[:i], True, where), render(tok, msgs[: i + 1], False, where)
        if not (whole.startswith(end) and end.startswith(start)) or len(start) < cuts[-1]:
            raise DataError(
                f"{locate(where or 'a record')}: the chat template does not render the first {i} messages as the "
                f"start of the conversation, so assistant turn {i} cannot be located; use a template that only "
                "appends per message"
            )
        cuts += [len(start), len(end)]
    cuts.append(len(whole))
    pieces = [whole[a:b] for a, b in zip(cuts[:-1], cuts[1:])]  # even: prompt, odd: an assistant turn
    ids = _encode_pieces(tok, pieces)
    head = [tok.bos_id] if tok.chat_template is None and tok.add_bos and tok.bos_id is not None else []
    tokens = np.concatenate([np.asarray(head, np.int32), *ids]).astype(np.int32)
    mask = np.concatenate([np.zeros(len(head), bool), *(np.full(len(p), k % 2 == 1) for k, p in enumerate(ids))])
    if not tokens.size or tokens[-1] != tok.eos_id:
        tokens = np.append(tokens, np.int32(tok.eos_id))
        mask = np.append(mask, msgs[-1]["role"] == "assistant")
    replies = sum(len(m["content"].encode("utf-8")) for m in msgs if m["role"] == "assistant")
    return tokens, mask, float(replies)


def _encode_pieces(tok, pieces: list[str]) -> list[np.ndarray]:
    """Each piece's ids, the special tokens' text in it as their ids (SentencePiece does not parse
    its control pieces out of text; `tokenizers` would do the same split for its added tokens)."""
    ids = {t: i for k, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id), ("pad_token", tok.pad_id))
           if i is not None and (t := tok.special_tokens.get(k))}  # fmt: skip
    split = re.compile("(" + "|".join(re.escape(t) for t in sorted(ids, key=len, reverse=True)) + ")")
    parts = [split.split(p) if ids else [p] for p in pieces]  # odd indices: a special token's text
    plain = [s for ps in parts for j, s in enumerate(ps) if j % 2 == 0 and s]
    encoded = iter(tok.encode_batch(plain) if plain else [])
    out = []
    for ps in parts:
        seq = [np.asarray([ids[s]], np.int32) if j % 2 else next(encoded) for j, s in enumerate(ps) if j % 2 or s]
        out.append(np.concatenate(seq).astype(np.int32) if seq else np.zeros(0, np.int32))
    return out


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson: jinja2's own escapes HTML characters."""
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}, transformers' marker of assistant text, renders its
    body: the assistant turns are found from prefixes here, templates with the marker or without alike."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The template compiled as transformers compiles chat templates (once per process and template)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)
