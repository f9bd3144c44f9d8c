"""Parquet files for `neo4j-admin database import full`: the first build of an empty local database.

Writing a million nodes through Bolt transactions costs hours at 8192 dims (each MERGE checks the id
index, each vector crosses the wire as a row of a transaction); Neo4j's offline importer writes the store
files directly. The files hold exactly the properties the transactional path writes (`upsert_samples`,
`sync_similar`, `sync_conflict`), in the importer's header syntax (`name:type`, `:ID(group)`), so a graph
imported once and then extended by transactions is the graph the transactions alone would have written.
Files are written in row groups, so memory stays one group of rows whatever the pool's size.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ID_GROUP = "Sample"
# properties of a :Sample as upsert_samples writes them, with their importer types
SAMPLE_COLUMNS = {"id": "string", "space": "string", "row": "long", "source_file": "string", "line": "long",
                  "dataset": "string", "content_hash": "string", "n_tokens": "long", "n_loss_tokens": "long",
                  "preview": "string", "gradient_f32": "byte[]", "validation_key": "string",
                  "validation_dots": "byte[]"}


def _pa():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as exc:  # a dependency of the package: only a broken install lacks it
        raise ImportError("pyarrow is needed to write the importer's parquet files (pip install pyarrow)") from exc
    return pyarrow


def byte_rows(matrix: np.ndarray, dtype: str):
    """Each row of `matrix` as little-endian `dtype` bytes, as the importer's byte[] column (list<int8>;
    it does not read parquet's binary type as byte[])."""
    pa = _pa()
    data = np.ascontiguousarray(matrix, dtype=dtype)
    width = data.shape[1] * data.dtype.itemsize
    offsets = np.arange(0, len(data) * width + 1, width, dtype=np.int64)
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(data.view(np.int8).reshape(-1)))


def _column(name: str, kind: str, values: Any):
    pa = _pa()
    if kind == "byte[]" and not isinstance(values, (pa.Array, pa.ChunkedArray)):
        raise TypeError(f"{name}: byte[] columns are built with byte_rows")
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    types = {"string": pa.string(), "long": pa.int64(), "double": pa.float64()}
    return pa.array(values, type=types[kind])


class ParquetWriter:
    """One importer input file, written a row group at a time."""

    def __init__(self, path: Path, header: dict[str, tuple[str, str]]):
        """`header`: our column name -> (importer header, importer type)."""
        self.path = path
        self.header = header
        self._writer = None
        self.rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        pa = _pa()
        arrays = {head: _column(name, kind, columns[name]) for name, (head, kind) in self.header.items()}
        table = pa.table(arrays)
        if self._writer is None:
            self._writer = pa.parquet.ParquetWriter(self.path, table.schema, compression="none")
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> "ParquetWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sample_writer(path: Path) -> ParquetWriter:
    header = {"id": (f"id:ID({ID_GROUP})", "string"), "label": (":LABEL", "string")}
    header.update({name: (f"{name}:{kind}", kind) for name, kind in SAMPLE_COLUMNS.items() if name != "id"})
    return ParquetWriter(path, header)


def edge_writer(path: Path) -> ParquetWriter:
    return ParquetWriter(path, {"source": (f":START_ID({ID_GROUP})", "string"),
                                "target": (f":END_ID({ID_GROUP})", "string"), "type": (":TYPE", "string"),
                                "weight": ("weight:double", "double"), "rank": ("rank:long", "long")})


def write_edges(writer: ParquetWriter, kind: str, ids: np.ndarray, index: np.ndarray, weight: np.ndarray,
                rows: Iterable[np.ndarray], negative_only: bool = False) -> int:
    """The edges `sync_similar` / `sync_conflict` would write for these rows: weight = exact cosine, rank =
    position in the list (CONFLICT only for negative cosines). Returns how many were written."""
    written = 0
    for part in rows:
        idx, w = index[part], weight[part]
        rank = np.broadcast_to(np.arange(idx.shape[1]), idx.shape)
        keep = w < 0 if negative_only else np.ones(idx.shape, dtype=bool)
        source = np.broadcast_to(part[:, None], idx.shape)[keep]
        if not len(source):
            continue
        writer.write({"source": ids[source], "target": ids[idx[keep]], "type": [kind] * len(source),
                      "weight": w[keep], "rank": rank[keep]})
        written += len(source)
    return written
