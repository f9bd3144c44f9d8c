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


def every_command(group=main, path=()):
    import click

    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from every_command(command, path + (name,))
        else:
            yield path + (name,)


def bad_invocations(tmp_path, neo4j_uri) -> dict[tuple[str, ...], tuple[list[str], int, dict | None]]:
    """For each command, arguments it accepts syntactically that a user error makes it refuse."""
    (tmp_path / "empty").mkdir(exist_ok=True)
    records = tmp_path / "records.jsonl"
    records.write_text('{"prompt": "p", "completion": "c"}\n')
    bad_port = tmp_path / "bad-port.toml"
    bad_port.write_text("[server]\nport = 0\n")
    bad_demo = tmp_path / "bad-demo.toml"
    bad_demo.write_text("[demo]\nratio = 'half'\n")
    db = {"NEO4J_URI": neo4j_uri}
    empty = str(tmp_path / "empty")
    return {
        ("neo4j", "start"): (["--config", str(bad_port), "neo4j", "start"], 2, None),
        ("neo4j", "stop"): (["--config", str(bad_port), "neo4j", "stop"], 2, None),
        ("neo4j", "status"): (["--config", str(bad_port), "neo4j", "status"], 2, None),
        ("db", "init"): (["db", "init"], 3, {"NEO4J_URI": "bolt://127.0.0.1:1"}),
        ("db", "info"): (["db", "info"], 3, {"NEO4J_URI": "bolt://127.0.0.1:1"}),
        ("db", "reset"): (["db", "reset", "--yes"], 3, {"NEO4J_URI": "bolt://127.0.0.1:1"}),
        ("demo",): (["--config", str(bad_demo), "demo"], 2, None),
        ("data", "build"): (["data", "build", "gsm8k", "--out", str(tmp_path / "g.jsonl")], 2, None),
        ("data", "mix"): (["data", "mix", f"{records}:many", "--out", str(tmp_path / "m.jsonl")], 2, None),
        ("warmup", "run"): (["warmup", str(records), "--model", empty, "--out", str(tmp_path / "w"), "--epochs", "0"],
                            2, None),
        ("warmup", "import"): (["warmup", "import", empty, "--model", empty, "--out", str(tmp_path / "wi")], 2, None),
        ("gradients",): (["gradients", str(records), "--model", empty, "--checkpoint", empty, "--out",
                          str(tmp_path / "f"), "--dim", "0"], 2, None),
        ("graph", "build"): (["graph", "build", empty, "--k", "0"], 2, None),
        ("ingest",): (["ingest", str(records), "--model", empty, "--checkpoint", empty, "--features",
                       str(tmp_path / "f2")], 2, None),
        ("select",): (["select", "--ratio", "2"], 2, None),
        ("explain",): (["explain", "--run", "no-such-run", "--sample", "s0"], 2, db),
        ("runs", "compare"): (["runs", "compare", "no-such-run"], 2, db),
        ("export",): (["export", "no-such-run", "--format", "jsonl", "--out", str(tmp_path / "e")], 2, db),
        ("report",): (["report", "no-such-run", "--out", str(tmp_path / "r.html")], 2, db),
        ("finetune",): (["finetune", str(records), "--model", empty, "--out", str(tmp_path / "ft"), "--epochs", "0"],
                        2, None),
        ("evaluate",): (["evaluate", str(records), "--model", empty, "--out", str(tmp_path / "ev"), "--adapter",
                         "nameonly"], 2, None),
        ("import-less",): (["import-less", str(records), str(records), "--normalized", "--out", str(tmp_path / "l")],
                           2, None),
    }


def test_every_command_refuses_a_user_error_in_two_lines_without_a_traceback(isolated_home, tmp_path, neo4j_uri,
                                                                            graph):
    """Issue 16: each command, given an argument a user could get wrong, says error and hint, nothing else."""
    cases = bad_invocations(tmp_path, neo4j_uri)
    assert set(cases) == set(every_command()), "a new command needs its bad-argument case here"
    for command, (args, code, env) in cases.items():
        error, hint = refused(args, code, env)
        assert len(error) > len("error: ") and len(hint) > len("hint: "), command


def test_config_backed_options_take_their_choices_and_defaults_from_config():
    """Options for config fields are generated from the fields (config.py is the one home of choices and
    defaults): every choice list equals its Literal field's, and every stated default is the field's."""
    import dataclasses
    import re

    import click

    from g2is_graph import config as cfg

    classes = [c for c in vars(cfg).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    literal = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if cfg.choices_of(cls, f.name):
                literal.setdefault(f.name, set()).add(tuple(cfg.choices_of(cls, f.name)))
    aliases = {"projector_kind": "kind"}

    def commands(group=main):
        for command in group.commands.values():
            yield from commands(command) if isinstance(command, click.Group) else [command]

    checked = 0
    for command in commands():
        for param in command.params:
            if isinstance(param.type, click.Choice) and aliases.get(param.name, param.name) in literal:
                assert tuple(param.type.choices) in literal[aliases.get(param.name, param.name)], param.name
                checked += 1
            stated = re.search(r"\(default: ([^)]*)\)$", getattr(param, "help", None) or "")
            if stated and param.name in {f.name for c in classes for f in dataclasses.fields(c)}:
                defaults = {str(f.default) for c in classes for f in dataclasses.fields(c) if f.name == param.name}
                assert stated.group(1) in defaults | {"none", "True", "False"}, (param.name, stated.group(1))
    assert checked >= 10


def test_long_commands_freeze_only_a_fresh_process_imports():
    import gc
    import subprocess
    import sys

    import transformers  # noqa: F401  (this process has the model stack: a host like a notebook or this test run)

    from g2is_graph.cli import freeze_imports

    frozen = gc.get_freeze_count()
    freeze_imports()
    assert gc.get_freeze_count() == frozen  # the host's objects stay collectable, triton's unfrozen
    fresh = subprocess.run([sys.executable, "-c", "import gc, torch; from g2is_graph.cli import freeze_imports; "
                            "freeze_imports(); print(gc.get_freeze_count())"], capture_output=True, text=True, check=True)
    assert int(fresh.stdout) > 100_000  # a command started from the shell: torch and the package frozen


@pytest.mark.parametrize("entry", ["run", "main"])
def test_the_program_ends_a_long_command_without_the_interpreters_teardown(entry, tiny_model, pool_file, tmp_path):
    """`run` (the console script and `python -m g2is_graph.cli`) ends a warmup with os._exit once its output is
    flushed: an atexit hook never runs, the exit code, the printed checkpoints and the files are all there;
    `main`, which a host process calls, returns to the interpreter as usual."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    from ingest.warmup import Checkpoint

    out = tmp_path / "warm"
    code = ("import atexit, sys; atexit.register(lambda: print('teardown ran', flush=True)); "
            f"from g2is_graph.cli import {entry}; sys.argv = ['g2is'] + sys.argv[1:]; {entry}()")
    done = subprocess.run([sys.executable, "-c", code, "-q", "warmup", str(pool_file), "--model", str(tiny_model),
                           "--out", str(out), "--fraction", "0.2", "--lora-r", "2", "--lora-alpha", "4"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ("teardown ran" in done.stdout) == (entry == "main")
    assert done.stdout.startswith(f"{out / 'checkpoint-epoch1'}\tepoch 1")
    checkpoint = Checkpoint.load(out / "checkpoint-epoch1")
    assert checkpoint.step > 0 and load_file(checkpoint.path / "adapter_model.safetensors")
    assert len(load_file(checkpoint.path / "adam_state.safetensors")) > 0  # whole files: they parse
    refused_run = subprocess.run([sys.executable, "-c", code, "warmup", str(pool_file), "--model", str(tiny_model),
                                  "--out", str(tmp_path / "w2"), "--fraction", "2"], capture_output=True, text=True,
                                 timeout=600)
    assert refused_run.returncode == 2 and "error: " in refused_run.stderr and "Traceback" not in refused_run.stderr
