"""A selection run written out for the trainers people use, with the scores to re-cut its budget.

Formats (docs/formats.md):
- `jsonl`: the original records, byte for byte, in selection order;
- `llama-factory`: OpenAI-style `messages` records and their `dataset_info.json` entry (formatting sharegpt with
  role/content tags), merged into an existing dataset_info.json when the folder already has one, so the folder can
  be LLaMA-Factory's own `data/` directory;
- `hf`: a Hugging Face `datasets` folder (one parquet file and a dataset card) of TRL prompt-completion rows.
Each record must mean to the target trainer what it meant to g2is (the same turns, the loss on the same
tokens); one that cannot is refused with its file and line rather than rewritten.

Scores: for the scored methods (less, embedding, no-graph) every pool sample's score is recomputed from the graph
with the run's own config, by the same exact dot products the run ranked with, and the top of that ranking must
give back the run's picks in order (otherwise the graph changed since the run and the scores are refused). The
rows say (id, score, rank, component): LESS and embedding rank globally and name the validation group behind the
max; no-graph ranks within each component, and re-cutting it means each component in turn taking its new budget
of the highest-ranked samples not yet taken. g2is, no-gradient and random have no score order (the walk's order
depends on the budget), so no scores file is written for them, and the manifest says so.

Every path in the manifest is relative to the export folder, except the source files, which are given as
recorded at ingest and as resolved (absolute).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from g2is_graph.config import DataConfig, SelectionConfig, build, to_jsonable
from g2is_graph.data.records import Record, _parse_line
from g2is_graph.db.graph import Graph
from g2is_graph.errors import ConfigError, ExportError
from g2is_graph.files import atomic_write_text, sha256_file
from g2is_graph.numerics import exact_matvec
from g2is_graph.selection.runs import (
    SpaceInfo,
    components_of,
    load_validation,
    original_lines,
    space_info,
    vector_pages,
)

FORMATS = ("llama-factory", "hf", "jsonl")
SCORED_METHODS = ("less", "embedding", "no-graph")
LF_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
           "system_tag": "system"}


@dataclass
class ExportResult:
    out_dir: Path
    files: dict[str, str]  # role -> path relative to out_dir
    n_records: int
    n_score_rows: int | None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        scores = f", {self.n_score_rows} score rows" if self.n_score_rows is not None else ", no scores"
        return f"{self.n_records} records{scores}: " + ", ".join(f"{k} {v}" for k, v in self.files.items())


def run_record(graph: Graph, run_id: str) -> dict[str, Any]:
    """The run's record; a run that is not complete (running or failed) is refused: its picks are a part of a
    selection, never a dataset."""
    from g2is_graph.selection.explain import complete_run

    return complete_run(graph, run_id)


def run_config(run: dict[str, Any]) -> SelectionConfig:
    """The SelectionConfig the run recorded (unknown keys from a newer version are refused by name)."""
    return build(SelectionConfig, json.loads(run["config"]), "select")


def resolve_source(source_file: str, source_root: Path) -> Path:
    path = Path(source_file)
    return path if path.is_absolute() else source_root / path


def selected_records(graph: Graph, run_id: str, data: DataConfig, source_root: Path
                     ) -> tuple[list[Record], list[str], list[dict[str, Any]]]:
    """The run's records in selection order, parsed as ingest parsed them, their original lines and the picks."""
    picks = graph.read("run_picks", id=run_id)
    located = [(str(resolve_source(p["source_file"], source_root)), int(p["line"])) for p in picks]
    missing = sorted({path for path, _ in located if not Path(path).is_file()})
    if missing:
        raise ExportError(f"{missing[0]}: source file of selected samples not found (recorded relative to the "
                          "folder the pool was ingested from); pass --source-root with that folder")
    lines = original_lines(located)
    records = [_parse_line(line.rstrip("\n").encode("utf-8"), Path(path), number, data.sharegpt)
               for (path, number), line in zip(located, lines)]
    for pick, record in zip(picks, records):
        if record.id != pick["pick"]["id"]:
            raise ExportError(f"{record.source_file}:{record.line}: holds id {record.id!r}, but the run selected "
                              f"{pick['pick']['id']!r} there; the file changed since ingest")
    return records, lines, picks


# -- trainer formats ----------------------------------------------------------------------
def _turns(record: Record) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in record.messages]


def llama_factory_row(record: Record, data: DataConfig) -> dict[str, Any]:
    """One record as LLaMA-Factory sharegpt (OpenAI tags); LLaMA-Factory trains every assistant turn of it."""
    where = f"{record.source_file}:{record.line}"
    if data.prompt_completion == "raw" and record.schema == "prompt_completion":
        raise ExportError(f"{where}: g2is rendered this record as TRL's raw prompt + completion; LLaMA-Factory "
                          "renders every record with a chat template. Export with --format hf (TRL) instead")
    roles = [m.role for m in record.messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if not body or len(body) % 2 or any(r != ("user", "assistant")[i % 2] for i, r in enumerate(body)):
        raise ExportError(f"{where}: turns {roles} do not alternate user/assistant after an optional system turn, "
                          "which LLaMA-Factory requires (it would drop the record)")
    if record.completion_from is not None and "assistant" in roles[:record.completion_from]:
        raise ExportError(f"{where}: the prompt holds assistant turns that g2is did not train on; LLaMA-Factory "
                          "trains every assistant turn. Export with --format hf (TRL prompt-completion) instead")
    return {"id": record.id, "messages": _turns(record)}


def trl_row(record: Record, data: DataConfig) -> dict[str, Any]:
    """One record as a TRL prompt-completion row, whose completion-only loss is the one g2is computed."""
    where = f"{record.source_file}:{record.line}"
    if data.prompt_completion == "raw" and record.schema == "prompt_completion":
        return {"id": record.id, "prompt": record.messages[0].content, "completion": record.messages[1].content}
    start = record.completion_from
    if start is None:
        trained = [i for i, m in enumerate(record.messages) if m.role == "assistant"]
        if len(trained) != 1 or trained[0] != len(record.messages) - 1:
            raise ExportError(f"{where}: g2is trained {len(trained)} assistant turns of this record; a TRL "
                              "prompt-completion row trains only its completion. Export with --format llama-factory "
                              "(every assistant turn trained) instead")
        start = trained[0]
    turns = _turns(record)
    return {"id": record.id, "prompt": turns[:start], "completion": turns[start:]}


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def merge_dataset_info(path: Path, name: str, entry: dict[str, Any]) -> None:
    """Add or replace one entry of a LLaMA-Factory dataset_info.json, keeping every other entry."""
    info: dict[str, Any] = {}
    if path.exists():
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ExportError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}); fix or remove it") from exc
        if not isinstance(info, dict):
            raise ExportError(f"{path}: expected a JSON object of dataset entries")
    info[name] = entry
    atomic_write_text(path, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ConfigError("--format hf writes parquet and needs pyarrow: pip install pyarrow") from exc
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.partial")
    pq.write_table(pa.Table.from_pylist(rows), staging)
    os.replace(staging, path)


def dataset_card(name: str, run: dict[str, Any], n: int, raw: bool, data_file: str) -> str:
    kind = ("standard prompt-completion (strings; TRL appends EOS to the completion)" if raw else
            "conversational prompt-completion (lists of messages)")
    return f"""---
configs:
- config_name: default
  data_files:
  - split: train
    path: {data_file}
tags:
- g2is
---
# {name}

{n} records selected from a pool of {run.get('n_pool')} by g2is run `{run['id']}` (method `{run['method']}`).

Rows are TRL {kind}: `SFTTrainer` trains on the completion only, which is the loss g2is computed the
gradients with. Load with `datasets.load_dataset("<this folder>", split="train")`.
"""


# -- scores -------------------------------------------------------------------------------
def _ranking(scores: np.ndarray) -> np.ndarray:
    """Rows by descending score, equal scores by row: the order the run's exact top-n used."""
    return np.lexsort((np.arange(len(scores)), -scores))


def less_scores(vectors_pages, validation: np.ndarray, groups: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every row's LESS score (max over groups of the exact dot with the group's mean) and its argmax group."""
    names = sorted(set(groups))
    groups_arr = np.asarray(groups)
    means = [validation[groups_arr == name].astype(np.float64).mean(axis=0) for name in names]
    scores, best = [], []
    for vectors in vectors_pages:
        per_group = np.stack([exact_matvec(vectors, mean) for mean in means])
        scores.append(per_group.max(axis=0))
        best.append(per_group.argmax(axis=0))
    return np.concatenate(scores), np.concatenate(best), names


def _pages(graph: Graph, space: SpaceInfo):
    rows: list[str] = []

    def vectors():
        for records, page in vector_pages(graph.read, space.id):
            rows.extend(r["id"] for r in records)
            yield page
    return rows, vectors()


def score_rows(graph: Graph, run: dict[str, Any], data: DataConfig, picks: list[str], encoder=None,
               progress: bool = False, source_root: Path | None = None) -> list[dict[str, Any]]:
    """(id, score, rank, component) of every pool sample for a scored method, checked against the run's picks."""
    method = run["method"]
    config = run_config(run)
    space = space_info(graph)
    if space.id != run["space"] or space.n_samples != int(run["n_pool"]):
        raise ExportError(f"the graph now holds space {space.id} with {space.n_samples} samples; run {run['id']} "
                         f"ranked space {run['space']} with {run['n_pool']}: its scores cannot be recomputed "
                         "(export with --no-scores)")
    if method in ("less", "embedding"):
        if method == "less":
            validation, records = load_validation(graph, space, config.tasks)
            ids, pages = _pages(graph, space)
            groups = [r["subtask"] or r["task"] for r in records]
            scores, best, names = less_scores(pages, validation, groups)
        else:
            from g2is_graph.selection.embedding import embedded_space, load_encoder

            train, validation, records, ids = embedded_space(graph, space.id, config.tasks, encoder or load_encoder(),
                                                             progress, data.sharegpt, source_root)
            groups = [r["subtask"] or r["task"] for r in records]
            scores, best, names = less_scores([train], validation, groups)
        order = _ranking(scores)
        rows = [{"id": ids[r], "score": float(scores[r]), "rank": rank + 1, "component": names[best[r]]}
                for rank, r in enumerate(order)]
        _check_reproduces(run, picks, [row["id"] for row in rows[:len(picks)]])
        return rows
    if method == "no-graph":
        components = components_of(graph, space, config, int(run["n_requested"]))
        ids, pages = _pages(graph, space)
        per_component = [[] for _ in components]
        for vectors in pages:
            for ci, comp in enumerate(components):
                per_component[ci].append(exact_matvec(vectors, comp.vector))
        rows, taken, replay = [], set(), []
        for ci, (comp, parts) in enumerate(zip(components, per_component)):
            scores = np.concatenate(parts)
            order = _ranking(scores)
            rows += [{"id": ids[r], "score": float(scores[r]), "rank": rank + 1, "component": ci}
                     for rank, r in enumerate(order)]
            free = [ids[r] for r in order if ids[r] not in taken][:comp.budget]
            taken.update(free)
            replay += free
        _check_reproduces(run, picks, replay)
        return rows
    raise ExportError(f"method {method!r} has no score order")


def _check_reproduces(run: dict[str, Any], picks: list[str], replay: list[str]) -> None:
    if replay != picks:
        first = next((i for i, (a, b) in enumerate(zip(replay, picks)) if a != b), min(len(replay), len(picks)))
        raise ExportError(f"the recomputed {run['method']} ranking does not give back run {run['id']}'s picks (first "
                         f"difference at rank {first + 1}); the graph or validation set changed since the run "
                         "(export with --no-scores)")


# -- the export ---------------------------------------------------------------------------
def export_run(graph: Graph, run_id: str, fmt: str, out_dir: str | Path, data: DataConfig, name: str | None = None,
               source_root: str | Path | None = None, with_scores: bool = True, echo=print, encoder=None,
               progress: bool = False) -> ExportResult:
    if fmt not in FORMATS:
        raise ConfigError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    run = run_record(graph, run_id)
    out_dir = Path(out_dir)
    name = name or f"g2is_{run_id}".replace("-", "_")
    source_root = Path(source_root or ".").resolve()
    records, lines, picks = selected_records(graph, run_id, data, source_root)
    out_dir.mkdir(parents=True, exist_ok=True)  # the atomic writes create no parents
    files: dict[str, str] = {}
    notes: list[str] = []
    if data.template == "tulu":
        notes.append("g2is rendered records with LESS's tulu form; train with the same rendering for the same loss")
    if fmt == "jsonl":
        files["data"] = f"{name}.jsonl"
        atomic_write_text(out_dir / files["data"], "".join(lines))
    elif fmt == "llama-factory":
        rows = [llama_factory_row(r, data) for r in records]
        files["data"] = f"{name}.jsonl"
        atomic_write_text(out_dir / files["data"], _jsonl(rows))
        files["dataset_info"] = "dataset_info.json"
        merge_dataset_info(out_dir / files["dataset_info"], name, {
            "file_name": files["data"], "formatting": "sharegpt", "columns": {"messages": "messages"},
            "tags": LF_TAGS})
        notes.append(f"LLaMA-Factory: dataset_dir {out_dir}, dataset {name}; pick the template that matches the "
                     "model's chat template (g2is rendered with the tokenizer's own)")
    else:
        rows = [trl_row(r, data) for r in records]
        if len({isinstance(row["prompt"], str) for row in rows}) > 1:
            raise ExportError("the run mixes string prompt/completion records (rendered raw) with conversational "
                              "ones; one TRL dataset holds one kind. Export with --format jsonl instead")
        files["data"] = f"{name}/data/train-00000-of-00001.parquet"
        write_parquet(out_dir / files["data"], rows)
        files["card"] = f"{name}/README.md"
        atomic_write_text(out_dir / files["card"], dataset_card(name, run, len(rows), isinstance(rows[0]["prompt"], str),
                                                           "data/train-00000-of-00001.parquet"))
    n_scores = None
    scores_info: dict[str, Any]
    if not with_scores:
        scores_info = {"written": False, "why": "--no-scores"}
    elif run["method"] not in SCORED_METHODS:
        scores_info = {"written": False, "why": f"{run['method']} selects without a score order (the walk's order "
                                                "depends on the budget); re-run the selection for another budget"}
        notes.append(f"no scores file: {scores_info['why']}")
    else:
        rows = score_rows(graph, run, data, [r.id for r in records], encoder, progress, source_root)
        files["scores"] = f"{name}.scores.jsonl"
        atomic_write_text(out_dir / files["scores"], _jsonl(rows))
        n_scores = len(rows)
        scores_info = {"written": True, "rows": n_scores, "columns": ["id", "score", "rank", "component"],
                       "recut": ("components in order, each taking its budget of the highest-ranked samples not yet "
                                 "taken" if run["method"] == "no-graph" else "the top n by rank")}
    recorded = {str(resolve_source(p["source_file"], source_root)): p["source_file"] for p in picks}
    manifest = {"run": run_id, "method": run["method"], "format": fmt, "name": name,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "files": files, "n_records": len(records), "n_pool": run.get("n_pool"),
                "data_sha256": sha256_file(out_dir / files["data"]),
                "sources": [{"recorded": recorded[s], "resolved": s} for s in sorted(recorded)],
                "selection_config": json.loads(run["config"]), "data_config": to_jsonable(data),
                "scores": scores_info, "notes": notes}
    files["manifest"] = f"{name}.export.json"
    atomic_write_text(out_dir / files["manifest"], json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    for note in notes:
        echo(note)
    return ExportResult(out_dir, files, len(records), n_scores, notes)
