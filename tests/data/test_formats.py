"""Each input format gives the token ids and loss mask that its own trainer produces for the same record.

The oracles restate the trainers' documented rules independently of g2is's code path:
- LLaMA-Factory (alpaca and sharegpt converters, supervised processor with train_on_prompt and mask_history
  off, its `chatml` template: format_user "<|im_start|>user\\n{{content}}<|im_end|>\\n<|im_start|>assistant\\n",
  format_assistant "{{content}}<|im_end|>\\n", format_system "<|im_start|>system\\n{{content}}<|im_end|>\\n",
  each slot tokenized on its own without special tokens, prompts masked, every answer trained);
- TRL's SFTTrainer: conversational prompt-completion = prompt rendered with the generation prompt, prompt +
  completion rendered whole, completion mask by the prompt's token count; standard prompt-completion = EOS
  appended to the completion, prompt and prompt + completion tokenized as text.
The tiny model's chat template is ChatML, the template those LLaMA-Factory slots spell out.
"""

from __future__ import annotations

import json

import pytest

from g2is_graph.config import DataConfig, ShareGPTConfig
from g2is_graph.data.records import IGNORE_INDEX, RecordError, encode, read_jsonl
from g2is_graph.model.loading import load_tokenizer

LF_CHATML = {"system": "<|im_start|>system\n{content}<|im_end|>\n",
             "user": "<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
             "assistant": "{content}<|im_end|>\n"}


def lf_alpaca(example: dict) -> tuple[list[dict], str]:
    """LLaMA-Factory's alpaca converter: history pairs, then the non-empty instruction and input joined by \\n."""
    prompt = []
    for old_prompt, old_response in example.get("history") or []:
        prompt += [{"role": "user", "content": old_prompt}, {"role": "assistant", "content": old_response}]
    query = [example[k] for k in ("instruction", "input") if example.get(k)]
    prompt.append({"role": "user", "content": "\n".join(query)})
    return prompt + [{"role": "assistant", "content": example["output"]}], example.get("system") or ""


def lf_sharegpt(example: dict, tags: dict) -> tuple[list[dict], str]:
    """LLaMA-Factory's sharegpt converter for well-formed records (a leading system tag, then alternation)."""
    turns = example[tags["messages"]]
    system = example.get(tags["system"], "")
    if turns[0][tags["role_tag"]] == tags["system_tag"]:
        system, turns = turns[0][tags["content_tag"]], turns[1:]
    mapping = {tags["user_tag"]: "user", tags["assistant_tag"]: "assistant"}
    return [{"role": mapping[t[tags["role_tag"]]], "content": t[tags["content_tag"]]} for t in turns], system


def lf_encode(tokenizer, messages: list[dict], system: str) -> tuple[list[int], list[int]]:
    """LLaMA-Factory's supervised encoding: (source, target) pairs, sources masked, every target trained."""
    encoded = []
    for i, message in enumerate(messages):
        elements = [LF_CHATML["system"].format(content=system)] if i == 0 and system else []
        elements.append(LF_CHATML[message["role"]].format(content=message["content"]))
        encoded.append([t for e in elements if e for t in tokenizer.encode(e, add_special_tokens=False)])
    ids, labels = [], []
    for source, target in zip(encoded[0::2], encoded[1::2]):
        ids += source + target
        labels += [IGNORE_INDEX] * len(source) + target
    return ids, labels


def trl_conversational(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    mask = [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))
    return list(full), [t if m else IGNORE_INDEX for t, m in zip(full, mask)]


def trl_standard(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    if not completion.endswith(tokenizer.eos_token):
        completion += tokenizer.eos_token
    prompt_ids = tokenizer(text=prompt)["input_ids"]
    full = tokenizer(text=prompt + completion)["input_ids"]
    mask = [0] * len(prompt_ids) + [1] * (len(full) - len(prompt_ids))
    return list(full), [t if m else IGNORE_INDEX for t, m in zip(full, mask)]


def one(tmp_path, obj: dict, sharegpt: ShareGPTConfig | None = None):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(obj) + "\n")
    return read_jsonl(path, sharegpt=sharegpt).records[0]


def same_as(tokenizer, record, config: DataConfig, expected: tuple[list[int], list[int]]) -> None:
    encoded = encode(record, tokenizer, config)
    ids, labels = expected
    assert tokenizer.decode(encoded.input_ids) == tokenizer.decode(ids)  # the rendered text
    assert encoded.input_ids == ids and encoded.labels == labels  # the tokens and the loss mask


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(tiny_model)


@pytest.mark.parametrize("example", [
    {"instruction": "Add the numbers", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi", "input": "", "output": "hi"},
    {"instruction": "", "input": "only the input", "output": "ok"},
    {"instruction": "Now add 4", "input": "", "output": "9", "system": "You do sums.",
     "history": [["Add 2 and 3", "5"], ["Double it", "10"]]},
])
def test_alpaca_equals_llama_factory(tmp_path, tokenizer, example):
    record = one(tmp_path, example)
    messages, system = lf_alpaca(example)
    assert record.messages[-2].content == messages[-1 - 1]["content"]  # instruction + "\n" + input
    same_as(tokenizer, record, DataConfig(), lf_encode(tokenizer, messages, system))


@pytest.mark.parametrize("example, tags", [
    ({"conversations": [{"from": "human", "value": "hello"}, {"from": "gpt", "value": "hi there"}]}, None),
    ({"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "q1"},
                        {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"},
                        {"from": "gpt", "value": "a2"}]}, None),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "system": "column"}, None),
    ({"dialog": [{"speaker": "USER", "text": "ping"}, {"speaker": "BOT", "text": "pong"},
                 {"speaker": "USER", "text": "again"}, {"speaker": "BOT", "text": "pong pong"}]},
     {"messages": "dialog", "role_tag": "speaker", "content_tag": "text", "user_tag": "USER", "assistant_tag": "BOT"}),
])
def test_sharegpt_equals_llama_factory(tmp_path, tokenizer, example, tags):
    config = ShareGPTConfig(**(tags or {}))
    record = one(tmp_path, example, config)
    assert record.schema == "sharegpt"
    lf_tags = {"messages": config.messages, "system": config.system, "role_tag": config.role_tag,
               "content_tag": config.content_tag, "user_tag": config.user_tag, "assistant_tag": config.assistant_tag,
               "system_tag": config.system_tag}
    messages, system = lf_sharegpt(example, lf_tags)
    same_as(tokenizer, record, DataConfig(sharegpt=config), lf_encode(tokenizer, messages, system))


@pytest.mark.parametrize("example", [
    {"prompt": [{"role": "user", "content": "What is 2+2?"}], "completion": [{"role": "assistant", "content": "4"}]},
    {"prompt": [{"role": "system", "content": "Short answers."}, {"role": "user", "content": "q1"},
                {"role": "assistant", "content": "context answer"}, {"role": "user", "content": "q2"}],
     "completion": [{"role": "assistant", "content": "trained answer"}]},
])
def test_conversational_prompt_completion_equals_trl(tmp_path, tokenizer, example):
    record = one(tmp_path, example)
    expected = trl_conversational(tokenizer, example["prompt"], example["completion"])
    same_as(tokenizer, record, DataConfig(), expected)
    trained = tokenizer.decode([t for t in expected[1] if t != IGNORE_INDEX])
    assert "context answer" not in trained and trained.startswith(example["completion"][0]["content"])


@pytest.mark.parametrize("bos", [False, True])
def test_raw_prompt_completion_equals_trl_and_chat_stays_the_default(tmp_path, tiny_model, bos):
    tokenizer = load_tokenizer(tiny_model)
    if bos:  # a tokenizer that adds its BOS, as Llama's do: TRL's text path keeps it (masked, in the prompt)
        from tokenizers import processors

        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", tokenizer.bos_token_id)])
    example = {"prompt": "Question: 2+2?\nAnswer:", "completion": " 4"}
    record = one(tmp_path, example)
    expected = trl_standard(tokenizer, example["prompt"], example["completion"])
    same_as(tokenizer, record, DataConfig(prompt_completion="raw"), expected)
    assert (expected[0][0] == tokenizer.bos_token_id) == bos
    chat = encode(record, tokenizer, DataConfig())  # the default still wraps it in chat turns
    assert tokenizer.decode(chat.input_ids) == tokenizer.apply_chat_template(
        [{"role": "user", "content": example["prompt"]}, {"role": "assistant", "content": example["completion"]}],
        tokenize=False)


@pytest.mark.parametrize("obj, field, reason", [
    ({"conversations": [{"from": "human", "value": "q"}]}, "conversations", "ends with a 'human' turn"),
    ({"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
     "conversations[0].from", "expected 'human'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
     "conversations[1].from", "tool turns are not supported"),
    ({"conversations": [{"from": "system", "value": "s"}]}, "conversations", "no user/assistant turns"),
    ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, "conversations[0].value",
     "must be a string"),
    ({"instruction": "i", "output": "o", "history": [["only one"]]}, "history[0]", "pair of strings"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": "a"}, "completion", "list of messages"),
    ({"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "a"}]},
     "completion", "no assistant turn"),
])
def test_bad_records_of_the_new_formats_name_their_field(tmp_path, obj, field, reason):
    with pytest.raises(RecordError) as info:
        one(tmp_path, obj)
    assert info.value.field == field and reason in str(info.value) and info.value.line == 1


def test_loss_rule_is_part_of_the_content_hash_only_where_it_differs(tmp_path):
    turns = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    as_messages = one(tmp_path, {"messages": turns})
    as_trl = one(tmp_path, {"prompt": turns[:1], "completion": turns[1:]})
    as_sharegpt = one(tmp_path, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
    as_strings = one(tmp_path, {"prompt": "q", "completion": "a"})
    assert as_messages.content_hash == as_sharegpt.content_hash == as_strings.content_hash
    assert as_trl.content_hash != as_messages.content_hash and as_trl.completion_from == 1
