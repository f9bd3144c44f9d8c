"""The feature store: projected gradient features on disk, self-describing and resumable.

Layout of one store (one split, one checkpoint):
    meta.json                  what the features are: model, checkpoint, projector, gradient kind, dtype
    rows.jsonl                 row -> (file, line, id, content hash, dataset, task, subtask, token counts)
    chunks/chunk-NNNNN.safetensors   `raw` and `normalized` (L2) features of rows [start, stop)
    chunks/chunk-NNNNN.json    the chunk's rows, sha256, device and the shard (i, n) that wrote it;
                               written last, so its presence marks the chunk complete

The chunk plan (rows per chunk) is fixed at creation, so an interrupted job recomputes only missing
chunks and ends byte-identical to an uninterrupted run, and shards (`i/n` takes chunks c with c % n == i)
write disjoint files into the same store with no shared file to race on. Every read checks each chunk's
sha256: a truncated or corrupted chunk is reported, never read.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from g2is_graph.errors import StoreError, hinted
from g2is_graph.files import atomic_write_bytes, create_exclusive, sha256_file
from g2is_graph.provenance import check_saved, differing, provenance

FORMAT = "g2is-features-v1"
# fields of meta.json that must agree for features to be compared or merged
IDENTITY_FIELDS = ("format", "model", "checkpoint", "projector", "gradient", "parameters", "records_sha256",
                   "chunk_rows", "store_dtype", "model_dtype", "autocast", "data")
# identity fields added after stores were first written, with the value every older store implies
IMPLIED_FIELDS = {"autocast": "float32"}


def records_sha256(rows: Sequence[dict[str, Any]]) -> str:
    """Identity of the row list (ids and content), so a resume over different input is refused."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(f"{row['id']}\t{row['content_hash']}\n".encode())
    return digest.hexdigest()


def normalize_rows(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features.astype(np.float64), axis=1, keepdims=True)
    if np.any(norms == 0):
        raise StoreError("a feature row has zero norm and cannot be normalised")
    return (features / norms).astype(np.float32)


@dataclass(frozen=True)
class ChunkPlan:
    n_rows: int
    chunk_rows: int

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_rows / self.chunk_rows)

    def bounds(self, chunk: int) -> tuple[int, int]:
        return chunk * self.chunk_rows, min(self.n_rows, (chunk + 1) * self.chunk_rows)


class FeatureStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._meta: dict[str, Any] | None = None

    # -- creation --------------------------------------------------------------------------
    @classmethod
    def create_or_open(cls, path: str | Path, meta: dict[str, Any], rows: Sequence[dict[str, Any]]) -> "FeatureStore":
        """Open a store for writing; an existing one must describe the same features and rows."""
        requested = meta
        meta = {"format": FORMAT, **meta, "n_rows": len(rows), "records_sha256": records_sha256(rows),
                "provenance": provenance()}
        store = cls(path)
        meta_path = store.path / "meta.json"
        if meta_path.exists() and store._torn_meta():
            meta_path.unlink()  # an older g2is killed while writing it, before any chunk: nothing to keep
        if meta_path.exists():
            existing = store.meta
            check_saved({**IMPLIED_FIELDS, **existing}, {**IMPLIED_FIELDS, **meta}, list(IDENTITY_FIELDS) + ["n_rows"],
                        meta_path, "gradient job", StoreError)
            return store
        (store.path / "chunks").mkdir(parents=True, exist_ok=True)
        body = "".join(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
        atomic_write_bytes(store.path / "rows.jsonl", body.encode("utf-8"))
        # several shards may create the same store at once: the first complete meta.json wins, the rest must match
        if not create_exclusive(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode()):
            return cls.create_or_open(path, requested, rows)
        return store

    def _torn_meta(self) -> bool:
        """meta.json empty or cut short while no chunk was written (a kill during its creation)."""
        try:
            json.loads((self.path / "meta.json").read_text())
            return False
        except (json.JSONDecodeError, UnicodeDecodeError):
            return not any((self.path / "chunks").glob("chunk-*.json"))

    # -- metadata --------------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        if self._meta is None:
            meta_path = self.path / "meta.json"
            try:
                self._meta = json.loads(meta_path.read_text())
            except FileNotFoundError as exc:
                raise StoreError(f"{self.path}: not a feature store (no meta.json)") from exc
            except json.JSONDecodeError as exc:
                raise StoreError(f"{meta_path}: corrupted ({exc.msg})") from exc
            if self._meta.get("format") != FORMAT:
                raise StoreError(f"{meta_path}: unknown format {self._meta.get('format')!r}")
        return self._meta

    @property
    def plan(self) -> ChunkPlan:
        return ChunkPlan(self.meta["n_rows"], self.meta["chunk_rows"])

    @property
    def dim(self) -> int:
        return int(self.meta["projector"]["dim"])

    def rows(self) -> list[dict[str, Any]]:
        return list(self.iter_rows())

    def iter_rows(self) -> Iterator[dict[str, Any]]:
        """The row map one row at a time (a million rows' dicts are about a gigabyte)."""
        with open(self.path / "rows.jsonl", encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield json.loads(line)

    def check_compatible(self, other: "FeatureStore", fields: Sequence[str] = ("model", "projector", "parameters")) -> None:
        """Refuse to compare features from different models, adapters or projectors."""
        different = differing(self.meta, other.meta, fields)
        if different:
            raise StoreError(f"{self.path} and {other.path} differ in {', '.join(different)}: "
                             "their features live in different spaces and cannot be compared")

    # -- chunks ----------------------------------------------------------------------------
    def _chunk_paths(self, chunk: int) -> tuple[Path, Path]:
        base = self.path / "chunks" / f"chunk-{chunk:05d}"
        return base.with_suffix(".safetensors"), base.with_suffix(".json")

    def chunk_complete(self, chunk: int) -> bool:
        """Complete = sidecar present and matching the data file (a torn or corrupt chunk is redone)."""
        data, sidecar = self._chunk_paths(chunk)
        if not sidecar.exists() or not data.exists():
            return False
        try:
            info = json.loads(sidecar.read_text())
        except json.JSONDecodeError:
            return False
        return info.get("sha256") == sha256_file(data)

    def missing_chunks(self, shard: tuple[int, int] = (0, 1)) -> list[int]:
        index, count = shard
        return [c for c in range(self.plan.n_chunks) if c % count == index and not self.chunk_complete(c)]

    def write_chunk(self, chunk: int, raw: np.ndarray | None, normalized: np.ndarray, device: str,
                    shard: tuple[int, int] = (0, 1)) -> None:
        from safetensors.numpy import save

        start, stop = self.plan.bounds(chunk)
        if normalized.shape != (stop - start, self.dim):
            raise StoreError(f"chunk {chunk}: expected {(stop - start, self.dim)} features, got {normalized.shape}")
        for name, array in (("raw", raw), ("normalized", normalized)):
            if array is not None and not np.all(np.isfinite(array)):
                bad = int(np.where(~np.isfinite(array).all(axis=1))[0][0]) + start
                raise StoreError(f"{self.path}: non-finite {name} feature for row {bad}; nothing was written")
        dtype = np.float16 if self.meta["store_dtype"] == "float16" else np.float32
        tensors = {"normalized": np.ascontiguousarray(normalized, dtype=dtype)}
        if raw is not None:
            tensors["raw"] = np.ascontiguousarray(raw, dtype=dtype)
        data, sidecar = self._chunk_paths(chunk)
        atomic_write_bytes(data, save(tensors))
        info = {"chunk": chunk, "rows": [start, stop], "sha256": sha256_file(data), "device": device,
                "shard": list(shard), "tensors": sorted(tensors)}
        atomic_write_bytes(sidecar, json.dumps(info, sort_keys=True).encode())

    def read_chunk(self, chunk: int, name: str = "normalized") -> np.ndarray:
        from safetensors.numpy import load

        data, sidecar = self._chunk_paths(chunk)
        try:
            info = json.loads(sidecar.read_text())
        except FileNotFoundError as exc:
            raise StoreError(f"{sidecar}: missing: chunk {chunk} was never completed (re-run the job to resume)") from exc
        except json.JSONDecodeError as exc:
            raise StoreError(f"{sidecar}: corrupted") from exc
        try:
            blob = data.read_bytes()
        except FileNotFoundError as exc:
            raise StoreError(f"{data}: missing") from exc
        if hashlib.sha256(blob).hexdigest() != info.get("sha256"):
            raise StoreError(f"{data}: checksum mismatch (truncated or corrupted); delete it and re-run the job")
        tensors = load(blob)
        if name not in tensors:
            raise StoreError(f"{data}: has no {name!r} features (it holds {', '.join(sorted(tensors))})")
        return tensors[name].astype(np.float32)

    def verify(self) -> None:
        """Every chunk present and intact: no gaps, no corruption."""
        missing = [c for c in range(self.plan.n_chunks) if not self.chunk_complete(c)]
        if missing:
            raise StoreError(f"{self.path}: {len(missing)} of {self.plan.n_chunks} chunks missing or corrupted "
                             f"(first: {missing[0]}); re-run the job to complete it")

    def load(self, name: str = "normalized") -> np.ndarray:
        """All features [n_rows, dim] as float32, checksums verified."""
        if name not in ("normalized", "raw"):
            raise ValueError("name must be 'normalized' or 'raw'")
        out = np.empty((self.plan.n_rows, self.dim), dtype=np.float32)
        for chunk in range(self.plan.n_chunks):
            start, stop = self.plan.bounds(chunk)
            out[start:stop] = self.read_chunk(chunk, name)
        return out


def import_less(matrix_path: str | Path, jsonl_paths: Sequence[str | Path], out: str | Path, normalized: bool,
                meta: dict[str, Any], chunk_rows: int = 4096) -> FeatureStore:
    """A LESS datastore (`all_orig.pt` = normalised, `all_unormalized.pt` = raw) with its jsonl, as a store."""
    import torch

    from g2is_graph.data.records import read_many

    records = read_many(jsonl_paths).records
    try:
        matrix = torch.load(matrix_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to unpickle means: not a saved tensor
        raise hinted(StoreError(f"{matrix_path}: not a saved torch tensor ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:200] if str(exc) else 'unreadable'})"),
                     "pass LESS's all_orig.pt (--normalized) or all_unormalized.pt (--raw)") from exc
    if not isinstance(matrix, torch.Tensor) or matrix.ndim != 2:
        what = f"a {matrix.ndim}-D tensor" if isinstance(matrix, torch.Tensor) else f"a {type(matrix).__name__}"
        raise hinted(StoreError(f"{matrix_path}: expected a 2-D tensor (rows x dims), got {what}"),
                     "pass LESS's all_orig.pt (--normalized) or all_unormalized.pt (--raw)")
    features = matrix.float().numpy()
    if features.shape[0] != len(records):
        raise StoreError(f"{matrix_path}: {features.shape[0]} rows but the jsonl files hold {len(records)} records")
    if not np.all(np.isfinite(features)):
        bad = int(np.where(~np.isfinite(features).all(axis=1))[0][0])
        raise StoreError(f"{matrix_path}: row {bad} ({records[bad].source_file}:{records[bad].line}) is not finite")
    if normalized:
        features = checked_unit_rows(features, matrix_path, records)
    rows = [record_row(r) for r in records]
    full_meta = {"model": meta.get("model", {"path": "unknown (LESS import)"}),
                 "checkpoint": meta.get("checkpoint", {"name": Path(matrix_path).parent.name}),
                 "projector": {**meta.get("projector", {"kind": "trak"}), "dim": features.shape[1]},
                 "gradient": meta.get("gradient", {"kind": "imported", "source": "LESS"}),
                 "parameters": meta.get("parameters"), "chunk_rows": chunk_rows, "store_dtype": "float32",
                 "model_dtype": meta.get("model_dtype"), "data": meta.get("data"),
                 "imported_from": str(matrix_path)}
    return write_array_store(out, features, rows, full_meta, raw=not normalized)


UNIT_NORM_TOLERANCE = 1e-2  # |norm - 1| accepted as "normalised" (float16 LESS stores round to ~1e-3)


def checked_unit_rows(features: np.ndarray, matrix_path, records) -> np.ndarray:
    """Rows that claim to be normalised must have unit norm: raw features taken for normalised ones would
    give edge weights that are not cosines. Within the tolerance they are renormalised exactly."""
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    bad = np.flatnonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE)
    if len(bad):
        r = int(bad[0])
        raise hinted(StoreError(f"{matrix_path}: row {r} ({records[r].source_file}:{records[r].line}) has norm "
                                f"{norms[r]:.4g}, not 1 ({len(bad)} of {len(norms)} rows are not unit length)"),
                     "these are raw features: import them with --raw (LESS's all_unormalized.pt), which normalises them")
    return (features / norms[:, None]).astype(np.float32)


def write_array_store(out: str | Path, features: np.ndarray, rows: Sequence[dict[str, Any]], meta: dict[str, Any],
                      raw: bool = True) -> FeatureStore:
    """A store from an in-memory matrix (imports, synthetic benchmarks); `raw` says what `features` are."""
    if features.shape[0] != len(rows):
        raise StoreError(f"{out}: {features.shape[0]} feature rows for {len(rows)} records")
    meta = {**meta, "has_raw": raw}
    meta["projector"] = {**meta.get("projector", {}), "dim": int(features.shape[1])}
    store = FeatureStore.create_or_open(out, meta, rows)
    normalized_features = normalize_rows(features) if raw else features
    for chunk in store.missing_chunks():
        start, stop = store.plan.bounds(chunk)
        store.write_chunk(chunk, features[start:stop] if raw else None, normalized_features[start:stop], "cpu")
    return store


def record_row(record, encoded=None) -> dict[str, Any]:
    """The row-map entry of one record."""
    row = {"id": record.id, "source_file": record.source_file, "line": record.line,
           "content_hash": record.content_hash, "dataset": record.dataset, "task": record.task,
           "subtask": record.subtask, "preview": record.preview()}
    if encoded is not None:
        row.update(n_tokens=encoded.n_tokens, n_loss_tokens=encoded.n_loss_tokens)
    return row
