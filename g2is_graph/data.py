"""jsonl records -> one record type -> token ids with assistant-only loss labels.

Three schemas are read: `messages` (system/user/assistant turns), `prompt`/`completion`, and Alpaca
`instruction`/`input`/`output`. Every problem is a `RecordError` naming file, line, field and reason;
with `skip_bad` the record is skipped and the error goes to a report file instead. The original line
is kept byte-for-byte so selections are written out unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import DataConfig

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")
PREVIEW_CHARS = 200


class RecordError(ValueError):
    """A bad input record: names the file, line, field and reason."""

    def __init__(self, path: str | Path, line: int, field_name: str | None, reason: str, record_id: str | None = None):
        self.path, self.line, self.field, self.reason, self.record_id = str(path), line, field_name, reason, record_id
        where = f"{path}:{line}" + (f": field '{field_name}'" if field_name else "")
        super().__init__(f"{where}: {reason}")

    def as_json(self) -> dict[str, Any]:
        return {"file": self.path, "line": self.line, "field": self.field, "id": self.record_id, "reason": self.reason}


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

    def preview(self, chars: int = PREVIEW_CHARS) -> str:
        text = " | ".join(f"{m.role}: {m.content}" for m in self.messages)
        return text if len(text) <= chars else text[: chars - 1] + "…"


@dataclass
class ReadResult:
    records: list[Record]
    skipped: list[RecordError] = field(default_factory=list)


def content_hash(messages: Sequence[Message]) -> str:
    """Hash of the conversation only (not id/dataset): what incremental ingest deduplicates on."""
    canonical = json.dumps([[m.role, m.content] for m in messages], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _string(obj: dict, key: str, path, line: int, required: bool = True) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise RecordError(path, line, key, "missing")
        return None
    if not isinstance(value, str):
        raise RecordError(path, line, key, f"must be a string, got {type(value).__name__}")
    return value


def parse_messages(obj: dict, path, line: int, max_turns: int = DataConfig.max_turns) -> tuple[Message, ...]:
    """The conversation of one json object, whichever of the three schemas it uses."""
    if "messages" in obj:
        turns = obj["messages"]
        if not isinstance(turns, list) or not turns:
            raise RecordError(path, line, "messages", "must be a non-empty list of {role, content}")
        if len(turns) > max_turns:
            raise RecordError(path, line, "messages", f"{len(turns)} turns, more than max_turns {max_turns} "
                              "([data] max_turns); split the conversation or raise the bound")
        messages = []
        for i, turn in enumerate(turns):
            name = f"messages[{i}]"
            if not isinstance(turn, dict):
                raise RecordError(path, line, name, "must be an object with role and content")
            role, content = turn.get("role"), turn.get("content")
            if role not in ROLES:
                raise RecordError(path, line, f"{name}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
            if not isinstance(content, str):
                raise RecordError(path, line, f"{name}.content", f"must be a string, got {type(content).__name__}")
            messages.append(Message(role, content))
        if not any(m.role == "assistant" for m in messages):
            raise RecordError(path, line, "messages", "no assistant turn: nothing to compute a loss on")
        return tuple(messages)
    if "prompt" in obj or "completion" in obj:
        prompt = _string(obj, "prompt", path, line)
        completion = _string(obj, "completion", path, line)
        return (Message("user", prompt), Message("assistant", completion))
    if "instruction" in obj:
        instruction = _string(obj, "instruction", path, line)
        extra = _string(obj, "input", path, line, required=False)
        output = _string(obj, "output", path, line)
        prompt = instruction if not extra else f"{instruction}\n\n{extra}"
        return (Message("user", prompt), Message("assistant", output))
    raise RecordError(path, line, None, "unknown schema: expected 'messages', 'prompt'/'completion' or "
                      f"'instruction'/'output'; keys are {sorted(obj)[:8]}")


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


def read_jsonl(path: str | Path, skip_bad: bool = False, limits: DataConfig | None = None,
               already: int = 0) -> ReadResult:
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
            record = _parse_line(raw_bytes, path, number, limits.max_turns)
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


def _parse_line(raw_bytes: bytes, path: Path, number: int, max_turns: int = DataConfig.max_turns) -> Record:
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
    messages = parse_messages(obj, path, number, max_turns)
    digest = content_hash(messages)
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
        id_generated=record_id is None,
    )


def read_many(paths: Iterable[str | Path], skip_bad: bool = False, limits: DataConfig | None = None) -> ReadResult:
    """Several files as one pool (at most `limits.max_records` records in all); ids must be unique across
    all of them."""
    limits = limits or DataConfig()
    out = ReadResult([])
    first: dict[str, Record] = {}
    for path in paths:
        result = read_jsonl(path, skip_bad, limits, already=len(out.records))
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
    """(text, is_loss) pieces whose concatenation is the chat template's rendering, produced lazily: each
    assistant turn renders the whole prefix again, so `encode` stops asking once max_length is reached."""
    if not getattr(tokenizer, "chat_template", None):
        raise RecordError(record.source_file, record.line, None,
                          "the tokenizer has no chat template; use template='tulu'", record.id)
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


def _segments_tulu(messages: Sequence[Message], eos: str, eos_after_assistant: bool) -> Iterator[tuple[str, bool]]:
    """LESS / open-instruct's tulu rendering; the assistant header belongs to the masked prompt."""
    for message in messages:
        if message.role == "assistant":
            yield "<|assistant|>\n", False
            yield message.content.strip() + (eos if eos_after_assistant else "") + "\n", True
        else:
            yield f"<|{message.role}|>\n{message.content.strip()}\n", False


def encode(record: Record, tokenizer, config: DataConfig) -> Encoded:
    """Token ids and labels (-100 outside assistant turns), truncated to max_length."""
    if all(not m.content.strip() for m in record.messages if m.role == "assistant"):
        raise RecordError(record.source_file, record.line, "messages",
                          "no loss token: the assistant answer is empty", record.id)
    if config.template == "model":
        segments = _segments_model_template(record.messages, tokenizer, record)
        ids: list[int] = []
        labels: list[int] = []
    elif config.template == "tulu":
        segments = _segments_tulu(record.messages, tokenizer.eos_token or "", config.eos_after_assistant)
        ids = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        labels = [IGNORE_INDEX] * len(ids)
    else:
        raise ValueError(f"template must be 'model' or 'tulu', not {config.template!r}")
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
    read = read_many(paths, config.skip_bad, config)
    records, encoded, skipped = encode_all(read.records, tokenizer, config)
    skipped = read.skipped + skipped
    if skipped:
        write_skip_report(report_dir / "skipped.jsonl", skipped)
        echo(f"skipped {len(skipped)} bad records (see {report_dir / 'skipped.jsonl'})")
    return records, encoded
