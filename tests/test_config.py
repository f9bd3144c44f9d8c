"""Config values are checked against their dataclass fields: types, ranges, known tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from g2is_graph import config as cfg


@pytest.mark.parametrize("cls, section, values, message", [
    (cfg.GraphConfig, "graph", {"k": "8"}, r"\[graph\] k must be an integer, not '8' \(str\)"),
    (cfg.GraphConfig, "graph", {"exact": "no"}, r"\[graph\] exact must be true or false, not 'no'"),
    (cfg.GraphConfig, "graph", {"k": True}, r"\[graph\] k must be an integer, not True \(bool\)"),
    (cfg.ServerConfig, "server", {"auth": "false"}, r"\[server\] auth must be true or false, not 'false'"),
    (cfg.ServerConfig, "server", {"port": 70000}, r"\[server\] port must be in 1..65535"),
    (cfg.WarmupConfig, "warmup", {"lora": {"target_modules": "q_proj"}},
     r"\[warmup.lora\] target_modules must be a list of strings, not 'q_proj'"),
    (cfg.WarmupConfig, "warmup", {"lora": 4}, r"\[warmup\] lora must be a table of r, alpha"),
    (cfg.WarmupConfig, "warmup", {"epochs": 0}, r"\[warmup\] epochs must be at least 1, not 0"),
    (cfg.WarmupConfig, "warmup", {"fraction": 2}, r"\[warmup\] fraction must be in \(0, 1\], not 2.0"),
    (cfg.FinetuneConfig, "finetune", {"batch_size": 0}, r"\[finetune\] batch_size and grad_accumulation"),
    (cfg.DataConfig, "data", {"max_turns": 0}, r"\[data\] max_turns must be positive"),
    (cfg.ConnectionConfig, "neo4j", {"password": 1234}, r"\[neo4j\] password must be a string, not \(value not shown\)"),
    (cfg.ConnectionConfig, "neo4j", {"uri": "http://localhost:7474"}, r"the scheme must be one of bolt"),
])
def test_wrong_types_and_ranges_are_refused_by_name(cls, section, values, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.build(cls, values, section)


def test_values_of_the_right_type_are_converted_as_their_field_says():
    server = cfg.build(cfg.ServerConfig, {"state_dir": "~/g2is-state", "start_timeout_s": 5}, "server")
    assert server.state_dir == Path("~/g2is-state").expanduser() and server.start_timeout_s == 5.0
    warmup = cfg.build(cfg.WarmupConfig, {"lora": {"target_modules": ["q_proj"]}, "max_examples": None}, "warmup")
    assert warmup.lora.target_modules == ("q_proj",) and warmup.max_examples is None
    assert cfg.build(cfg.SelectionConfig, {"tasks": ["gsm8k"]}, "select").tasks == ("gsm8k",)


def test_unknown_tables_and_non_table_keys_are_refused_with_the_file(tmp_path):
    path = tmp_path / "g2is.toml"
    path.write_text("[grpah]\nk = 8\n")
    with pytest.raises(cfg.ConfigError, match=rf"{path}: unknown table\(s\) or top-level key\(s\): grpah; known"):
        cfg.load_file(path)
    path.write_text("port = 7687\n")
    with pytest.raises(cfg.ConfigError, match="unknown table.*: port"):
        cfg.load_file(path)
    path.write_text('[select]\nratio = "0.05"\n')
    with pytest.raises(cfg.ConfigError, match=rf"{path}: \[select\] ratio must be a number, not '0.05'"):
        cfg.load_file(path)
    with pytest.raises(cfg.ConfigError, match="is a directory"):
        cfg.load_file(tmp_path)
    path.write_text('[graph]\nk = 8\nexact = true\n[data]\nmax_turns = 64\n')
    assert cfg.load_file(path) == {"graph": {"k": 8, "exact": True}, "data": {"max_turns": 64}}
