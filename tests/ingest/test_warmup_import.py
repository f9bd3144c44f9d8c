"""`g2is warmup import` on checkpoints that a real transformers.Trainer run writes (LoRA on the tiny model): the
Adam moments come out keyed by name and equal to the trainer's live optimizer state, the learning rates are
the logged ones, the result feeds the gradient job, and mismatched inputs are refused with the reason."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import write_pool

from g2is_graph.cli import main
from g2is_graph.config import DataConfig, GradientConfig, LoraSettings, ProjectorConfig
from g2is_graph.data.records import encode_all, read_jsonl
from g2is_graph.model.loading import add_lora, build_tiny_model, load_base_model, load_tokenizer
from ingest.gradients import run_gradients
from ingest.warmup import Checkpoint, checkpoint_weights
from ingest.warmup_import import WarmupImportError, import_checkpoints


@pytest.fixture(scope="module")
def trainer_run(tiny_model, tmp_path_factory):
    """Four optimizer steps of the HF Trainer (AdamW, linear schedule with warmup), saved every two steps."""
    from transformers import Trainer, TrainingArguments

    root = tmp_path_factory.mktemp("trainer")
    pool = write_pool(root / "pool.jsonl", 16, seed=5)
    tokenizer = load_tokenizer(tiny_model)
    _, encoded, _ = encode_all(read_jsonl(pool).records, tokenizer, DataConfig(max_length=48))
    examples = [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]

    def collate(batch):
        width = max(len(b["input_ids"]) for b in batch)
        pad = tokenizer.pad_token_id
        return {"input_ids": torch.tensor([b["input_ids"] + [pad] * (width - len(b["input_ids"])) for b in batch]),
                "labels": torch.tensor([b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]),
                "attention_mask": torch.tensor([[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"]))
                                                for b in batch])}

    torch.manual_seed(0)
    model = add_lora(load_base_model(tiny_model), LoraSettings(r=4, alpha=8, dropout=0.0))
    args = TrainingArguments(output_dir=str(root / "out"), max_steps=4, per_device_train_batch_size=4,
                             learning_rate=5e-3, lr_scheduler_type="linear", warmup_steps=1, logging_steps=1,
                             save_strategy="steps", save_steps=2, report_to=[], use_cpu=True, seed=0,
                             remove_unused_columns=False, optim="adamw_torch", weight_decay=0.01,
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=examples, data_collator=collate)
    trainer.train()
    live = {name: {k: v.detach().clone() for k, v in trainer.optimizer.state[param].items()}
            for name, param in trainer.model.named_parameters() if param.requires_grad}
    return root, live, [e for e in trainer.state.log_history if "learning_rate" in e]


def test_trainer_checkpoints_become_name_keyed_g2is_checkpoints(trainer_run, tiny_model, tmp_path):
    from safetensors.torch import load_file

    root, live, logged = trainer_run
    sources = [root / "out" / "checkpoint-4", root / "out" / "checkpoint-2"]  # any order: sorted by step
    imported = import_checkpoints(sources, tiny_model, tmp_path / "warm", echo=lambda m: None)
    assert [c.name for c in imported] == ["checkpoint-2", "checkpoint-4"] and [c.step for c in imported] == [2, 4]
    moments = load_file(imported[-1].path / "adam_state.safetensors")
    assert sorted(k.rsplit("::", 1)[0] for k in moments)[::2] == sorted(live)
    for name, state in live.items():  # the last checkpoint holds the trainer's final optimizer state
        assert torch.equal(moments[f"{name}::exp_avg"], state["exp_avg"].float())
        assert torch.equal(moments[f"{name}::exp_avg_sq"], state["exp_avg_sq"].float())
    rates = [e["learning_rate"] for e in logged]
    assert len(rates) == 4 and rates[0] < rates[1]  # warmup, then linear decay
    assert list(imported[0].epoch_lrs) == rates[:2] and list(imported[1].epoch_lrs) == rates[2:]
    state = json.loads((imported[1].path / "trainer_state.json").read_text())
    assert state["lr_steps"] == [1, 2, 3, 4] and state["beta1"] == 0.9 and state["config"]["weight_decay"][0] == 0.01
    weights = checkpoint_weights(imported)
    assert weights[0] == pytest.approx(sum(rates[:2]) / sum(rates))
    reloaded = Checkpoint.load(imported[0].path)
    assert reloaded.adam_state(state["parameter_names"]).step == 2


def test_imported_checkpoints_feed_the_gradient_job_and_the_cli(trainer_run, tiny_model, tmp_path):
    root, _, _ = trainer_run
    runner = CliRunner()
    result = runner.invoke(main, ["-q", "warmup", "import", str(root / "out" / "checkpoint-2"),
                                  str(root / "out" / "checkpoint-4"), "--model", str(tiny_model),
                                  "--out", str(tmp_path / "warm")])
    assert result.exit_code == 0, result.output
    assert "checkpoint-4\tstep 4" in result.output
    job = run_gradients([root / "pool.jsonl"], tiny_model, [tmp_path / "warm" / "checkpoint-4"], tmp_path / "feat",
                        GradientConfig(kind="adam", chunk_rows=8), ProjectorConfig(dim=16), DataConfig(max_length=48),
                        progress=False, echo=lambda m: None)
    assert job.rows == 16
    meta = json.loads((job.stores[0] / "meta.json").read_text())
    assert meta["checkpoint"]["name"] == "checkpoint-4" and meta["checkpoint"]["step"] == 4
    # the plain warmup command still parses as before beside the new subcommand
    assert runner.invoke(main, ["warmup", "--help"]).exit_code == 0


def test_mismatches_are_refused_with_the_reason(trainer_run, tiny_model, tmp_path):
    root, _, _ = trainer_run
    other = build_tiny_model(tmp_path / "wider", hidden=48)
    with pytest.raises(WarmupImportError, match="does not fit the base model"):
        import_checkpoints([root / "out" / "checkpoint-2"], other, tmp_path / "a", echo=lambda m: None)

    broken = tmp_path / "checkpoint-2"
    shutil.copytree(root / "out" / "checkpoint-2", broken)
    saved = torch.load(broken / "optimizer.pt", weights_only=True)
    saved["state"][0]["exp_avg"] = saved["state"][0]["exp_avg"].T.contiguous()
    torch.save(saved, broken / "optimizer.pt")
    with pytest.raises(WarmupImportError, match=r"exp_avg of parameter 0 has shape .* on this base model"):
        import_checkpoints([broken], tiny_model, tmp_path / "b", echo=lambda m: None)

    saved["param_groups"][0]["params"] = saved["param_groups"][0]["params"][:-1]
    torch.save(saved, broken / "optimizer.pt")
    with pytest.raises(WarmupImportError, match="not this adapter's optimizer"):
        import_checkpoints([broken], tiny_model, tmp_path / "c", echo=lambda m: None)

    saved = torch.load(root / "out" / "checkpoint-2" / "optimizer.pt", weights_only=True)
    saved["state"] = {k: {"step": v["step"], "sum": v["exp_avg"]} for k, v in saved["state"].items()}
    torch.save(saved, broken / "optimizer.pt")
    with pytest.raises(WarmupImportError, match="not Adam's exp_avg"):
        import_checkpoints([broken], tiny_model, tmp_path / "d", echo=lambda m: None)

    (broken / "optimizer.pt").unlink()
    with pytest.raises(WarmupImportError, match="missing optimizer.pt.*DeepSpeed"):
        import_checkpoints([broken], tiny_model, tmp_path / "e", echo=lambda m: None)
    result = CliRunner().invoke(main, ["-q", "warmup", "import", str(broken), "--model", str(tiny_model),
                                       "--out", str(tmp_path / "f")])
    assert result.exit_code == 2 and "missing optimizer.pt" in result.output and "Traceback" not in result.output


def test_an_interval_without_a_logged_rate_takes_the_scheduler_and_says_so(trainer_run, tiny_model, tmp_path):
    root, _, logged = trainer_run
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(root / "out" / "checkpoint-2", copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    state["log_history"] = [e for e in state["log_history"] if "learning_rate" not in e]
    (copy / "trainer_state.json").write_text(json.dumps(state))
    (imported,) = import_checkpoints([copy], tiny_model, tmp_path / "warm", echo=lambda m: None)
    saved = json.loads((imported.path / "trainer_state.json").read_text())
    assert saved["config"]["lr_source"].startswith("scheduler.pt")
    assert imported.epoch_lrs == (pytest.approx(logged[2]["learning_rate"]),)  # the rate of the next step
    assert Path(saved["config"]["imported_from"]) == copy.resolve()
