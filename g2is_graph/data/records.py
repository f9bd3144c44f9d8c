"""jsonl records -> one record type -> token ids with assistant-only loss labels.

Schemas, each read by the rule of the trainer that defines it (docs/formats.md):
- `messages` (system/user/assistant turns): loss on every assistant turn;
- ShareGPT `conversations` of `from`/`value` turns (tags configurable, `DataConfig.sharegpt`), LLaMA-Factory's
  rules: an optional leading system turn (or a `system` column), then strictly alternating user/assistant;
- LLaMA-Factory's Alpaca: `instruction` + "\n" + `input` as the user turn, `output` as the answer, an optional
  `system` and `history` ([prompt, response] pairs, trained like the last turn);
- TRL's prompt-completion: strings (chat turns by default, or TRL's raw `prompt + completion + EOS` with
  `prompt_completion = "raw"`), or lists of messages (conversational: the loss covers the completion only).
Every problem is a `RecordError` naming file, line, field and reason; with `skip_bad` the record is skipped
and the error goes to a report file instead. The original line is kept byte-for-byte so selections are
written out unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from g2is_graph.config import DataConfig, ShareGPTConfig
from g2is_graph.errors import RecordError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
PREVIEW_CHARS = 200


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Record:
    """One training or validation example with its provenance."""

    id: str
    source_file: str
    line: int
    messages: tuple[Message, ...]
    raw: str  # the original jsonl line, unchanged
    content_hash: str
    dataset: str | None = None
    task: str | None = None
    subtask: str | None = None
    id_generated: bool = False
    schema: str = "messages"  # messages | sharegpt | alpaca | prompt_completion | conversational_prompt_completion
    completion_from: int | None = None  # conversational prompt-completion: index of the first completion message

    def preview(self, chars: int = PREVIEW_CHARS) -> str:
        text = " | ".join(f"{m.role}: {m.content}" for m in self.messages)
        return text if len(text) <= chars else text[: chars - 1] + "…"


@dataclass
class ReadResult:
    records: list[Record]
    skipped: list[RecordError] = field(default_factory=list)


def content_hash(messages: Sequence[Message], completion_from: int | None = None) -> str:
    """Hash of the conversation (not id/dataset) and, for conversational prompt-completion records, of where the
    loss starts (their loss mask is not "every assistant turn"): what incremental ingest deduplicates on."""
    turns = [[m.role, m.content] for m in messages]
    body: Any = turns if completion_from is None else {"messages": turns, "completion_from": completion_from}
    canonical = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Parsed:
    """The conversation of one json object and the schema it was read with."""

    messages: tuple[Message, ...]
    schema: str
    completion_from: int | None = None


def _string(obj: dict, key: str, path, line: int, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise RecordError(path, line, key, "missing")
        return None
    if not isinstance(value, str):
        raise RecordError(path, line, key, f"must be a string, got {type(value).__name__}")
    return value


def _too_many_turns(turns: list, path, line: int, name: str, max_turns: int) -> None:
    if len(turns) > max_turns:
        raise RecordError(path, line, name, f"{len(turns)} turns, more than max_turns {max_turns} "
                          "([data] max_turns); split the conversation or raise the bound")


def _turns(value: Any, path, line: int, name: str, max_turns: int = DataConfig.max_turns) -> list[Message]:
    """A list of {role, content} objects (the `messages` schema and TRL's conversational lists)."""
    if not isinstance(value, list) or not value:
        raise RecordError(path, line, name, "must be a non-empty list of {role, content}")
    _too_many_turns(value, path, line, name, max_turns)
    messages = []
    for i, turn in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(path, line, where, "must be an object with role and content")
        role, content = turn.get("role"), turn.get("content")
        if role not in ROLES:
            raise RecordError(path, line, f"{where}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise RecordError(path, line, f"{where}.content", f"must be a string, got {type(content).__name__}")
        messages.append(Message(role, content))
    return messages


def _sharegpt(obj: dict, tags: ShareGPTConfig, path, line: int, max_turns: int = DataConfig.max_turns
              ) -> tuple[Message, ...]:
    """LLaMA-Factory's ShareGPT rule: a leading system-tag turn (else the system column), then user and
    assistant tags strictly alternating, ending with the assistant (the records it would drop are errors)."""
    turns = obj[tags.messages]
    name = tags.messages
    if not isinstance(turns, list) or not turns:
        raise RecordError(path, line, name, f"must be a non-empty list of {{{tags.role_tag}, {tags.content_tag}}}")
    _too_many_turns(turns, path, line, name, max_turns)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(path, line, f"{name}[{i}]", f"must be an object with {tags.role_tag} and {tags.content_tag}")
        if not isinstance(turn.get(tags.content_tag), str):
            raise RecordError(path, line, f"{name}[{i}].{tags.content_tag}",
                              f"must be a string, got {type(turn.get(tags.content_tag)).__name__}")
    system = None
    first = 0
    if turns[0].get(tags.role_tag) == tags.system_tag:
        system, first = turns[0][tags.content_tag], 1
    else:
        system = _string(obj, tags.system, path, line, required=False)
    messages = [Message("system", system)] if system else []
    expected = (tags.user_tag, tags.assistant_tag)
    for i in range(first, len(turns)):
        role = turns[i].get(tags.role_tag)
        want = expected[(i - first) % 2]
        if role != want:
            raise RecordError(path, line, f"{name}[{i}].{tags.role_tag}",
                              f"expected {want!r} (turns alternate {tags.user_tag!r}/{tags.assistant_tag!r} after an "
                              f"optional leading {tags.system_tag!r}; tool turns are not supported), got {role!r}")
        messages.append(Message("user" if role == tags.user_tag else "assistant", turns[i][tags.content_tag]))
    if len(turns) == first:
        raise RecordError(path, line, name, "no user/assistant turns: nothing to compute a loss on")
    if (len(turns) - first) % 2:
        raise RecordError(path, line, name, f"ends with a {tags.user_tag!r} turn: nothing to compute a loss on "
                          "(LLaMA-Factory drops such records)")
    return tuple(messages)


def _alpaca(obj: dict, path, line: int) -> tuple[Message, ...]:
    """LLaMA-Factory's Alpaca rule: system, history pairs, then "\n".join of the non-empty instruction and input."""
    instruction = _string(obj, "instruction", path, line)
    extra = _string(obj, "input", path, line, required=False)
    output = _string(obj, "output", path, line)
    system = _string(obj, "system", path, line, required=False)
    history = obj.get("history")
    messages = [Message("system", system)] if system else []
    if history is not None:
        if not isinstance(history, list):
            raise RecordError(path, line, "history", "must be a list of [prompt, response] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError(path, line, f"history[{i}]", "must be a [prompt, response] pair of strings")
            messages += [Message("user", pair[0]), Message("assistant", pair[1])]
    query = "\n".join(part for part in (instruction, extra) if part)
    return tuple(messages + [Message("user", query), Message("assistant", output)])


def parse_record(obj: dict, path, line: int, sharegpt: ShareGPTConfig | None = None,
                 max_turns: int = DataConfig.max_turns) -> Parsed:
    """The conversation of one json object, whichever schema it uses (at most `max_turns` turns per list)."""
    tags = sharegpt or ShareGPTConfig()
    if tags.messages in obj:  # sharegpt.messages = "messages" reads `messages` records by the ShareGPT rule
        return Parsed(_sharegpt(obj, tags, path, line, max_turns), "sharegpt")
    if "messages" in obj:
        messages = _turns(obj["messages"], path, line, "messages", max_turns)
        if not any(m.role == "assistant" for m in messages):
            raise RecordError(path, line, "messages", "no assistant turn: nothing to compute a loss on")
        return Parsed(tuple(messages), "messages")
    if "prompt" in obj or "completion" in obj:
        if isinstance(obj.get("prompt"), list) or isinstance(obj.get("completion"), list):
            for key in ("prompt", "completion"):
                if not isinstance(obj.get(key), list):
                    raise RecordError(path, line, key, "must be a list of messages like the other field "
                                      "(TRL's conversational prompt-completion), or both must be strings")
            prompt = _turns(obj["prompt"], path, line, "prompt", max_turns)
            completion = _turns(obj["completion"], path, line, "completion", max_turns)
            if not any(m.role == "assistant" for m in completion):
                raise RecordError(path, line, "completion", "no assistant turn: nothing to compute a loss on")
            return Parsed(tuple(prompt + completion), "conversational_prompt_completion", len(prompt))
        prompt = _string(obj, "prompt", path, line)
        completion = _string(obj, "completion", path, line)
        return Parsed((Message("user", prompt), Message("assistant", completion)), "prompt_completion")
    if "instruction" in obj:
        history = obj.get("history")
        if isinstance(history, list):
            _too_many_turns(history, path, line, "history", max_turns)
        return Parsed(_alpaca(obj, path, line), "alpaca")
    raise RecordError(path, line, None, f"unknown schema: expected 'messages', '{tags.messages}' (ShareGPT), "
                      "'prompt'/'completion' or 'instruction'/'output'; keys are " + str(sorted(obj)[:8]))


def parse_messages(obj: dict, path, line: int, sharegpt: ShareGPTConfig | None = None) -> tuple[Message, ...]:
    """The conversation of one json object, whichever schema it uses."""
    return parse_record(obj, path, line, sharegpt).messages


def _lines(path: Path, max_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, line without its newline) of a file, streamed; a line longer than `max_bytes` is
    never held in memory: its length in bytes comes instead of its content."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise RecordError(path, 0, None, f"cannot read: {exc.strerror or exc}") from exc
    with fh:
        number = 0
        while line := fh.readline(max_bytes + 1):
            number += 1
            if line.endswith(b"\n"):
                yield number, line[:-1]
            elif len(line) <= max_bytes:
                yield number, line  # the last line, without a newline
            else:
                length = len(line)
                while (rest := fh.readline(1 << 20)) and not rest.endswith(b"\n"):
                    length += len(rest)
                yield number, length + max(0, len(rest) - 1)


def read_jsonl(path: str | Path, skip_bad: bool = False, sharegpt: ShareGPTConfig | None = None,
               limits: DataConfig | None = None, already: int = 0) -> ReadResult:
    """Read one jsonl file, streamed, within the input bounds of `limits` (`already` records were read
    from earlier files of the same pool); duplicate ids (given or generated) are errors."""
    path = Path(path)
    limits = limits or DataConfig()
    records: list[Record] = []
    skipped: list[RecordError] = []
    seen: dict[str, int] = {}
    for number, raw_bytes in _lines(path, limits.max_line_bytes):
        if isinstance(raw_bytes, bytes) and not raw_bytes.strip():
            continue
        if already + len(records) >= limits.max_records:
            raise RecordError(path, number, None, f"more than max_records {limits.max_records} records "
                              "([data] max_records); split the pool or raise the bound")
        try:
            if isinstance(raw_bytes, int):
                raise RecordError(path, number, None, f"line of {raw_bytes} bytes, more than max_line_bytes "
                                  f"{limits.max_line_bytes} ([data] max_line_bytes); it was not parsed")
            record = _parse_line(raw_bytes, path, number, sharegpt, limits.max_turns)
            if record.id in seen:
                raise RecordError(path, number, "id", f"duplicate id {record.id!r} (first on line {seen[record.id]})"
                                  + (" (generated from identical content)" if record.id_generated else ""),
                                  record.id)
            seen[record.id] = number
            records.append(record)
        except RecordError as exc:
            if not skip_bad:
                raise
            skipped.append(exc)
    return ReadResult(records, skipped)


def _parse_line(raw_bytes: bytes, path: Path, number: int, sharegpt: ShareGPTConfig | None = None,
                max_turns: int = DataConfig.max_turns) -> Record:
    try:
        raw = raw_bytes.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError as exc:
        raise RecordError(path, number, None, f"invalid UTF-8 at byte {exc.start}") from exc
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RecordError(path, number, None, f"malformed JSON: {exc.msg} at column {exc.colno}") from exc
    if not isinstance(obj, dict):
        raise RecordError(path, number, None, f"each line must be a JSON object, got {type(obj).__name__}")
    parsed = parse_record(obj, path, number, sharegpt, max_turns)
    messages = parsed.messages
    digest = content_hash(messages, parsed.completion_from)
    record_id = obj.get("id")
    if record_id is not None and not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        raise RecordError(path, number, "id", f"must be a string or integer, got {type(record_id).__name__}")
    if record_id is not None and str(record_id).strip() == "":
        raise RecordError(path, number, "id", "must not be empty")
    meta = {}
    for key in ("dataset", "task", "subtask"):
        value = obj.get(key)
        if value is not None and not isinstance(value, str):
            raise RecordError(path, number, key, f"must be a string, got {type(value).__name__}")
        meta[key] = value
    return Record(
        id=str(record_id) if record_id is not None else f"sha256:{digest[:20]}",
        source_file=str(path), line=number, messages=messages, raw=raw, content_hash=digest,
        dataset=meta["dataset"], task=meta["task"] or meta["dataset"], subtask=meta["subtask"],
        id_generated=record_id is None, schema=parsed.schema, completion_from=parsed.completion_from,
    )


def read_many(paths: Iterable[str | Path], skip_bad: bool = False, sharegpt: ShareGPTConfig | None = None,
              limits: DataConfig | None = None) -> ReadResult:
    """Several files as one pool (at most `limits.max_records` records in all); ids must be unique across
    all of them."""
    limits = limits or DataConfig()
    out = ReadResult([])
    first: dict[str, Record] = {}
    for path in paths:
        result = read_jsonl(path, skip_bad, sharegpt, limits, already=len(out.records))
        out.skipped.extend(result.skipped)
        for record in result.records:
            if record.id in first:
                prev = first[record.id]
                error = RecordError(record.source_file, record.line, "id",
                                    f"duplicate id {record.id!r} (first at {prev.source_file}:{prev.line})", record.id)
                if not skip_bad:
                    raise error
                out.skipped.append(error)
                continue
            first[record.id] = record
            out.records.append(record)
    return out


def write_skip_report(path: str | Path, skipped: Sequence[RecordError]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for error in skipped:
            fh.write(json.dumps(error.as_json(), ensure_ascii=False) + "\n")


# -- tokenization --------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_loss_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _segments_model_template(messages: Sequence[Message], tokenizer, record: Record) -> Iterator[tuple[str, bool]]:
    """(text, is_loss) pieces whose concatenation is the chat template's rendering; every assistant turn is loss
    (LLaMA-Factory's multi-turn rule: each answer is trained, each prompt with its assistant header masked).
    Produced lazily: each assistant turn renders the whole prefix again, so `encode` stops asking once
    max_length is reached."""
    _require_chat_template(tokenizer, record)
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    rendered = ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(dicts[:i], tokenize=False, add_generation_prompt=True) if i else ""
        full = tokenizer.apply_chat_template(dicts[: i + 1], tokenize=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise RecordError(record.source_file, record.line, "messages",
                              "the chat template does not render prefixes consistently; use template='tulu'", record.id)
        yield prompt[len(rendered):], False
        yield full[len(prompt):], True
        rendered = full


def _require_chat_template(tokenizer, record: Record) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise RecordError(record.source_file, record.line, None,
                          "the tokenizer has no chat template; use template='tulu'", record.id)


def _segments_tulu(messages: Sequence[Message], eos: str, eos_after_assistant: bool,
                   completion_from: int | None = None) -> Iterator[tuple[str, bool]]:
    """LESS / open-instruct's tulu rendering; the assistant header belongs to the masked prompt. With
    `completion_from`, assistant turns before it are context (masked), as in TRL's prompt-completion."""
    for i, message in enumerate(messages):
        if message.role == "assistant":
            yield "<|assistant|>\n", False
            trained = completion_from is None or i >= completion_from
            yield message.content.strip() + (eos if eos_after_assistant else "") + "\n", trained
        else:
            yield f"<|{message.role}|>\n{message.content.strip()}\n", False


def _masked_by_prefix(prompt_ids: list[int], full_ids: list[int]) -> tuple[list[int], list[int]]:
    """TRL's completion mask: the first len(prompt_ids) tokens of the full sequence are prompt, the rest loss."""
    n = min(len(prompt_ids), len(full_ids))
    return list(full_ids), [IGNORE_INDEX] * n + list(full_ids[n:])


def _encode_trl_raw(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """TRL's standard prompt-completion: EOS appended to the completion unless it ends with it, prompt and
    prompt + completion tokenized as plain text (with the tokenizer's own special tokens, e.g. a BOS)."""
    prompt, completion = record.messages[0].content, record.messages[1].content
    eos = tokenizer.eos_token or ""
    if not completion.endswith(eos):
        completion += eos
    return _masked_by_prefix(tokenizer(text=prompt)["input_ids"], tokenizer(text=prompt + completion)["input_ids"])


def _encode_trl_conversational(record: Record, tokenizer) -> tuple[list[int], list[int]]:
    """TRL's conversational prompt-completion: the prompt rendered with the generation prompt, prompt +
    completion rendered whole, both tokenized as the chat template tokenizes (no added special tokens)."""
    _require_chat_template(tokenizer, record)
    dicts = [{"role": m.role, "content": m.content} for m in record.messages]
    prompt = tokenizer.apply_chat_template(dicts[: record.completion_from], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(dicts, tokenize=False)
    if not full.startswith(prompt):
        raise RecordError(record.source_file, record.line, "prompt", "the chat template renders the prompt "
                          "differently inside the whole conversation; use template='tulu'", record.id)
    return _masked_by_prefix(tokenizer(prompt, add_special_tokens=False)["input_ids"],
                             tokenizer(full, add_special_tokens=False)["input_ids"])


def encode(record: Record, tokenizer, config: DataConfig) -> Encoded:
    """Token ids and labels (-100 outside the trained part), truncated to max_length."""
    if all(not m.content.strip() for m in record.messages[record.completion_from or 0:] if m.role == "assistant"):
        raise RecordError(record.source_file, record.line, "messages",
                          "no loss token: the assistant answer is empty", record.id)
    if config.template not in ("model", "tulu"):
        raise ValueError(f"template must be 'model' or 'tulu', not {config.template!r}")
    if config.prompt_completion == "raw" and record.schema == "prompt_completion":
        ids, labels = _encode_trl_raw(record, tokenizer)
    elif config.template == "model" and record.completion_from is not None:
        ids, labels = _encode_trl_conversational(record, tokenizer)
    else:
        if config.template == "model":
            segments = _segments_model_template(record.messages, tokenizer, record)
            ids, labels = [], []
        else:
            segments = _segments_tulu(record.messages, tokenizer.eos_token or "", config.eos_after_assistant,
                                      record.completion_from)
            ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
            labels = [IGNORE_INDEX] * len(ids)
        for text, is_loss in segments:
            if not text:
                continue
            piece = tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if is_loss else [IGNORE_INDEX] * len(piece))
            if len(ids) >= config.max_length:
                break  # everything after max_length is truncated: never render or tokenise it
    encoded = Encoded(ids[: config.max_length], labels[: config.max_length])
    if encoded.n_loss_tokens == 0:
        raise RecordError(record.source_file, record.line, "messages", "no loss token after truncation to "
                          f"max_length {config.max_length} ({len(ids)} tokens rendered)", record.id)
    return encoded


def encode_all(records: Sequence[Record], tokenizer, config: DataConfig) -> tuple[list[Record], list[Encoded], list[RecordError]]:
    """Encode a pool; bad records raise, or are returned as skips when config.skip_bad."""
    kept, encoded, skipped = [], [], []
    for record in records:
        try:
            encoded.append(encode(record, tokenizer, config))
            kept.append(record)
        except RecordError as exc:
            if not config.skip_bad:
                raise
            skipped.append(exc)
    return kept, encoded, skipped


def collate(batch: Sequence[Encoded], pad_id: int):
    """Right-padded tensors; padding never carries loss."""
    import torch

    width = max(e.n_tokens for e in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = e.n_tokens
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention[i, :n] = 1
    return input_ids, labels, attention


def load_pool(paths: Iterable[str | Path], tokenizer, config: DataConfig, report_dir: Path,
              echo=print) -> tuple[list[Record], list[Encoded]]:
    """Read and encode jsonl files; skipped records (with skip_bad) go to report_dir/skipped.jsonl."""
    read = read_many(paths, config.skip_bad, config.sharegpt, config)
    records, encoded, skipped = encode_all(read.records, tokenizer, config)
    skipped = read.skipped + skipped
    if skipped:
        write_skip_report(report_dir / "skipped.jsonl", skipped)
        echo(f"skipped {len(skipped)} bad records (see {report_dir / 'skipped.jsonl'})")
    return records, encoded
