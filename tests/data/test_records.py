"""Reading the three jsonl schemas, errors that name file/line/field, tokenization with loss masks."""

from __future__ import annotations

import json

import pytest

from g2is_graph.config import DataConfig
from g2is_graph.data.records import (
    IGNORE_INDEX,
    RecordError,
    encode,
    encode_all,
    read_jsonl,
    read_many,
    write_skip_report,
)
from g2is_graph.model.loading import load_tokenizer


def write_lines(path, lines):
    path.write_bytes(b"\n".join(l if isinstance(l, bytes) else l.encode() for l in lines) + b"\n")
    return path


def test_three_schemas_read_to_the_same_shape(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"id": "a", "dataset": "d", "messages": [{"role": "system", "content": "s"},
                                                            {"role": "user", "content": "u"},
                                                            {"role": "assistant", "content": "x"}]}),
        json.dumps({"prompt": "p", "completion": "c", "dataset": "d2"}),
        json.dumps({"id": 7, "instruction": "i", "input": "in", "output": "o"}),
    ])
    records = read_jsonl(path).records
    assert [r.id for r in records[::2]] == ["a", "7"]
    assert records[1].id.startswith("sha256:") and records[1].id_generated
    assert [m.role for m in records[0].messages] == ["system", "user", "assistant"]
    assert records[2].messages[0].content == "i\nin" and records[2].messages[1].content == "o"  # LLaMA-Factory join
    assert records[1].line == 2 and records[1].raw == json.dumps({"prompt": "p", "completion": "c", "dataset": "d2"})
    # generated ids are stable: same content, same id
    assert read_jsonl(path).records[1].id == records[1].id


@pytest.mark.parametrize("line, field, reason", [
    (b'{"prompt": "x", ', None, "malformed JSON"),
    (b'[1, 2]', None, "must be a JSON object"),
    (b'{"text": "x"}', None, "unknown schema"),
    (b'{"prompt": 3, "completion": "x"}', "prompt", "must be a string"),
    (b'{"prompt": "x"}', "completion", "missing"),
    (b'{"messages": []}', "messages", "non-empty list"),
    (b'{"messages": [{"role": "bot", "content": "x"}]}', "messages[0].role", "must be one of"),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "messages", "no assistant turn"),
    (b'{"id": "", "prompt": "x", "completion": "y"}', "id", "must not be empty"),
    (b'{"id": [1], "prompt": "x", "completion": "y"}', "id", "string or integer"),
    (b'{"prompt": "caf\xe9", "completion": "y"}', None, "invalid UTF-8"),
])
def test_bad_lines_name_file_line_and_field(tmp_path, line, field, reason):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "ok", "completion": "ok"}), line])
    with pytest.raises(RecordError) as info:
        read_jsonl(path)
    error = info.value
    assert error.line == 2 and error.field == field and reason in str(error)
    assert str(path) in str(error)


def test_duplicate_ids_within_and_across_files(tmp_path):
    a = write_lines(tmp_path / "a.jsonl", [json.dumps({"id": "x", "prompt": "p", "completion": "c"}),
                                            json.dumps({"id": "x", "prompt": "q", "completion": "c"})])
    with pytest.raises(RecordError, match="duplicate id 'x' \\(first on line 1\\)"):
        read_jsonl(a)
    b = write_lines(tmp_path / "b.jsonl", [json.dumps({"id": "y", "prompt": "p", "completion": "c"})])
    c = write_lines(tmp_path / "c.jsonl", [json.dumps({"id": "y", "prompt": "p2", "completion": "c"})])
    with pytest.raises(RecordError, match="first at .*b.jsonl:1"):
        read_many([b, c])
    same = write_lines(tmp_path / "same.jsonl", [json.dumps({"prompt": "p", "completion": "c"})] * 2)
    with pytest.raises(RecordError, match="generated from identical content"):
        read_jsonl(same)


def test_skip_bad_writes_every_skip_to_the_report(tmp_path):
    path = write_lines(tmp_path / "mixed.jsonl", [json.dumps({"prompt": "p", "completion": "c"}), b"{oops",
                                                   json.dumps({"text": 1}), json.dumps({"prompt": "q", "completion": "d"})])
    result = read_jsonl(path, skip_bad=True)
    assert len(result.records) == 2 and [e.line for e in result.skipped] == [2, 3]
    report = tmp_path / "skipped.jsonl"
    write_skip_report(report, result.skipped)
    rows = [json.loads(l) for l in report.read_text().splitlines()]
    assert [(r["line"], r["file"]) for r in rows] == [(2, str(path)), (3, str(path))]


def test_assistant_only_labels_in_model_and_tulu_templates(tmp_path, tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    path = write_lines(tmp_path / "c.jsonl", [json.dumps({"messages": [
        {"role": "user", "content": "first"}, {"role": "assistant", "content": "ONE"},
        {"role": "user", "content": "second"}, {"role": "assistant", "content": "TWO"}]})])
    record = read_jsonl(path).records[0]
    encoded = encode(record, tokenizer, DataConfig())
    assert encoded.n_tokens == len(encoded.labels)
    loss_text = tokenizer.decode([t for t in encoded.labels if t != IGNORE_INDEX])
    assert loss_text == "ONE<|im_end|>\nTWO<|im_end|>\n"
    assert tokenizer.decode(encoded.input_ids) == tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in record.messages], tokenize=False)
    tulu = encode(record, tokenizer, DataConfig(template="tulu"))
    assert tokenizer.decode([t for t in tulu.labels if t != IGNORE_INDEX]) == "ONE<|im_end|>\nTWO<|im_end|>\n"
    assert "<|assistant|>\n" in tokenizer.decode(tulu.input_ids)
    no_eos = encode(record, tokenizer, DataConfig(template="tulu", eos_after_assistant=False))
    assert tokenizer.decode([t for t in no_eos.labels if t != IGNORE_INDEX]) == "ONE\nTWO\n"


def test_no_loss_token_after_truncation_or_empty_answer(tmp_path, tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"prompt": "x" * 100, "completion": "answer"}),
                                               json.dumps({"prompt": "short", "completion": ""})])
    long_record, empty_record = read_jsonl(path).records
    with pytest.raises(RecordError, match=r":1: field 'messages': no loss token after truncation to max_length 50"):
        encode(long_record, tokenizer, DataConfig(max_length=50))
    with pytest.raises(RecordError, match=r":2: .*no loss token: the assistant answer is empty"):
        encode(empty_record, tokenizer, DataConfig(template="tulu", eos_after_assistant=False))
    kept, encoded, skipped = encode_all([long_record, empty_record], tokenizer,
                                        DataConfig(max_length=50, template="tulu", eos_after_assistant=False, skip_bad=True))
    assert kept == [] and [s.line for s in skipped] == [1, 2]


def conversation(turns: int) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i} " + "w " * 20}
                         for i in range(turns)]}


def test_input_bounds_are_checked_before_parsing_rendering_or_tokenising(tmp_path):
    """Issue 15 (6): a 3 MiB line is refused unparsed and the next lines are still read; thousands of turns
    are refused before any turn is rendered; a pool over max_records is refused where it overflows."""
    huge = json.dumps({"prompt": "x" * (3 << 20), "completion": "c"})
    path = write_lines(tmp_path / "big.jsonl", [
        json.dumps({"prompt": "p", "completion": "c"}), huge, json.dumps(conversation(5000)),
        json.dumps({"prompt": "q", "completion": "d"}),
    ])
    with pytest.raises(RecordError, match=rf"{path}:2: line of {len(huge)} bytes, more than max_line_bytes 1048576"):
        read_jsonl(path)
    read = read_jsonl(path, skip_bad=True)
    assert [r.line for r in read.records] == [1, 4]
    assert [(e.line, e.field) for e in read.skipped] == [(2, None), (3, "messages")]
    assert "5000 turns, more than max_turns 256 ([data] max_turns)" in str(read.skipped[1])
    assert [r.line for r in read_jsonl(path, skip_bad=True, limits=DataConfig(max_line_bytes=4 << 20,
                                                                              max_turns=5000)).records] == [1, 2, 3, 4]
    other = write_lines(tmp_path / "more.jsonl", [json.dumps({"prompt": f"p{i}", "completion": "c"}) for i in range(3)])
    with pytest.raises(RecordError, match=rf"{other}:3: more than max_records 4 records"):
        read_many([path, other], skip_bad=True, limits=DataConfig(max_records=4))


def test_encoding_stops_rendering_turns_once_max_length_is_reached(tmp_path, tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    record = read_jsonl(write_lines(tmp_path / "long.jsonl", [json.dumps(conversation(200))])).records[0]
    full = encode(record, tokenizer, DataConfig(max_length=100_000))
    renders = []
    render = tokenizer.apply_chat_template
    tokenizer.apply_chat_template = lambda *a, **k: renders.append(1) or render(*a, **k)
    short = encode(record, tokenizer, DataConfig(max_length=256))
    assert (short.input_ids, short.labels) == (full.input_ids[:256], full.labels[:256])
    assert full.n_tokens > 20 * 256 and len(renders) <= 8  # the first assistant turns only, not 2 x 100
    tulu_full = encode(record, tokenizer, DataConfig(template="tulu", max_length=100_000))
    tulu = encode(record, tokenizer, DataConfig(template="tulu", max_length=256))
    assert (tulu.input_ids, tulu.labels) == (tulu_full.input_ids[:256], tulu_full.labels[:256])
