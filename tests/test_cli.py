"""Every error a user can cause ends in one `error:` line and one `hint:` line that points the right way, with
the exit code of its kind and no traceback unless --verbose; nothing half-written is left behind."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from click.testing import CliRunner

from g2is_graph.cli import main


def refused(args: list[str], code: int, env: dict[str, str] | None = None) -> tuple[str, str]:
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and lines[1].startswith("hint: "), result.output
    assert "Traceback" not in result.output
    return lines[0], lines[1]


@pytest.mark.parametrize("toml, message", [
    ('[graph]\nk = "8"\n', r"[graph] k must be an integer, not '8' (str)"),
    ('[server]\nauth = "false"\n', "[server] auth must be true or false, not 'false' (str)"),
    ("[grpah]\nk = 8\n", "unknown table(s) or top-level key(s): grpah"),
])
def test_config_files_with_wrong_types_or_unknown_tables(isolated_home, tmp_path, toml, message):
    (tmp_path / "g2is.toml").write_text(toml)
    error, hint = refused(["--config", str(tmp_path / "g2is.toml"), "neo4j", "status"], 2)
    assert message in error and "g2is.toml" in hint


def test_config_naming_a_folder_and_bad_uris(isolated_home, tmp_path):
    error, _ = refused(["--config", str(tmp_path), "neo4j", "status"], 2)
    assert "is a directory, not a TOML config file" in error
    for uri, message in (("foo://x", "the scheme must be one of bolt"), ("bolt://host:notaport", "Port could not")):
        error, _ = refused(["db", "info"], 2, env={"NEO4J_URI": uri, "NEO4J_PASSWORD": "pw-in-env"})
        assert message in error and "pw-in-env" not in error


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "[warmup] epochs must be at least 1, not 0"),
    (["--fraction", "2"], "[warmup] fraction must be in (0, 1], not 2.0"),
    (["--batch-size", "0"], "[warmup] batch_size and grad_accumulation must be at least 1"),
])
def test_warmup_flags_out_of_range_are_refused_before_any_model_loads(pool_file, tmp_path, flags, message):
    error, _ = refused(["warmup", str(pool_file), "--model", str(tmp_path / "no-model"), "--out",
                        str(tmp_path / "w"), *flags], 2)
    assert message in error and not (tmp_path / "w").exists()


def test_a_checkpoint_folder_without_its_state_file(pool_file, tmp_path):
    (tmp_path / "checkpoint-epoch1").mkdir()
    error, hint = refused(["gradients", str(pool_file), "--model", str(tmp_path / "no-model"), "--checkpoint",
                           str(tmp_path / "checkpoint-epoch1"), "--out", str(tmp_path / "g")], 2)
    assert "checkpoint-epoch1: not a g2is warmup checkpoint (no trainer_state.json)" in error
    assert "`g2is warmup` wrote" in hint


def test_import_less_refuses_what_is_not_a_tensor_and_unnormalised_rows_claimed_normalised(pool_file, tmp_path):
    (tmp_path / "noise.pt").write_bytes(os.urandom(256))
    error, hint = refused(["import-less", str(tmp_path / "noise.pt"), str(pool_file), "--raw", "--out",
                           str(tmp_path / "a")], 2)
    assert "noise.pt: not a saved torch tensor" in error and "all_orig.pt" in hint
    torch.save({"features": torch.zeros(3)}, tmp_path / "dict.pt")
    error, _ = refused(["import-less", str(tmp_path / "dict.pt"), str(pool_file), "--raw", "--out",
                        str(tmp_path / "b")], 2)
    assert "expected a 2-D tensor (rows x dims), got a dict" in error
    raw = torch.randn(30, 8, generator=torch.Generator().manual_seed(0)) * 40
    torch.save(raw, tmp_path / "raw.pt")
    error, hint = refused(["import-less", str(tmp_path / "raw.pt"), str(pool_file), "--normalized", "--out",
                           str(tmp_path / "c")], 2)
    assert "raw.pt: row 0 (" in error and "pool.jsonl:1) has norm" in error and "not 1 (30 of 30 rows" in error
    assert "--raw" in hint and not (tmp_path / "c").exists()
    assert CliRunner().invoke(main, ["import-less", str(tmp_path / "raw.pt"), str(pool_file), "--raw", "--out",
                                     str(tmp_path / "c")]).exit_code == 0


def test_full_and_unwritable_disks(pool_file, tmp_path, monkeypatch):
    torch.save(torch.randn(30, 8), tmp_path / "m.pt")
    error, hint = refused(["data", "mix", f"{pool_file}:5", "--out", "/dev/full"], 6)  # a real ENOSPC
    assert "No space left on device" in error and "disk is full" in hint
    error, hint = refused(["import-less", str(tmp_path / "m.pt"), str(pool_file), "--raw", "--out",
                           "/sys/g2is-cannot-write-here"], 6)
    assert "/sys/g2is-cannot-write-here" in error

    from g2is_graph import files

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", disk_full)  # the disk fills while a store is written
    error, hint = refused(["import-less", str(tmp_path / "m.pt"), str(pool_file), "--raw", "--out",
                           str(tmp_path / "store")], 6)
    assert error == f"error: {tmp_path / 'store' / 'rows.jsonl'}: No space left on device"
    assert hint == "hint: the disk is full: free space, or write to another disk"
    assert [p.name for p in (tmp_path / "store").rglob("*") if p.is_file()] == []  # no torn file left


def test_verbose_adds_the_traceback(isolated_home, tmp_path):
    result = CliRunner().invoke(main, ["--verbose", "--config", str(tmp_path), "neo4j", "status"])
    assert result.exit_code == 2 and "Traceback" in result.output and "error: " in result.output
