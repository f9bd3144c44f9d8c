"""CSV files for `neo4j-admin database import full`: the first build of an empty local database.

Writing a million nodes through Bolt transactions costs hours at 8192 dims (each MERGE checks the id
index, each vector crosses the wire as a row of a transaction); Neo4j's offline importer writes the store
files directly. The files hold exactly the properties the transactional path writes (`upsert_samples`,
`sync_similar`, `sync_conflict`), in the importer's header syntax (`name:type`, `:ID(group)`), so a graph
imported once and then extended by transactions is the graph the transactions alone would have written.

CSV, not parquet: the importer's parquet reader takes a byte[] column element by element (50,000 nodes at
1024 dims: 61 s of node import from parquet, 16 s from CSV, 20 s with the node file read as multi-line;
docs/decisions.md). A byte[] value is its bytes as signed integers joined by `;`, made with numpy (a
lookup table of the 256 fixed-width spellings); strings are quoted with inner quotes doubled (pyarrow's
writer), and each writer notes whether a string held a line break (the import is then read multi-line).
Files are written a group of rows at a time, so memory stays one group whatever the pool's size.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

ID_GROUP = "Sample"
ARRAY_DELIMITER = ";"
# properties of a :Sample as upsert_samples writes them, with their importer types
SAMPLE_COLUMNS = {"id": "string", "space": "string", "row": "long", "source_file": "string", "line": "long",
                  "dataset": "string", "content_hash": "string", "n_tokens": "long", "n_loss_tokens": "long",
                  "preview": "string", "gradient_f32": "byte[]", "validation_key": "string",
                  "validation_dots": "byte[]"}


def _pa():
    try:
        import pyarrow
        import pyarrow.csv  # noqa: F401
    except ImportError as exc:  # a dependency of the package: only a broken install lacks it
        raise ImportError("pyarrow is needed to write the importer's CSV files (pip install pyarrow)") from exc
    return pyarrow


WIDTH = 5  # characters per byte in a byte[] field


def _spellings() -> tuple[np.ndarray, np.ndarray]:
    """Every signed byte v = -128..127 spelled in exactly 5 characters: `;0127` / `;-128` after the first
    number of a row, `00127` / `-0128` as the first (the importer reads leading zeros)."""
    values = range(-128, 128)
    rest = np.array([(f"{ARRAY_DELIMITER}{v:04d}" if v >= 0 else f"{ARRAY_DELIMITER}-{-v:03d}").encode()
                     for v in values], dtype=f"S{WIDTH}")
    first = np.array([(f"{v:05d}" if v >= 0 else f"-{-v:04d}").encode() for v in values], dtype=f"S{WIDTH}")
    return first, rest


_FIRST, _REST = _spellings()


def byte_rows(matrix: np.ndarray, dtype: str):
    """Each row of `matrix` as little-endian `dtype` bytes in the importer's byte[] text (`-0012;0007;...`),
    as a pyarrow string column built from one buffer by one table lookup per byte (no Python object per row
    or per byte). Fixed width, so the offsets are a range: 5x faster than minimal spellings, 10% more text."""
    pa = _pa()
    data = np.ascontiguousarray(matrix, dtype=dtype)
    width = data.shape[1] * data.dtype.itemsize
    codes = data.view(np.uint8).reshape(len(data), width) ^ np.uint8(0x80)  # int8 v -> index v + 128
    text = _REST[codes]
    if width:
        text[:, 0] = _FIRST[codes[:, 0]]
    offsets = np.arange(len(data) + 1, dtype=np.int64) * (width * WIDTH)
    return pa.LargeStringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(text.view(np.uint8)))


def repeated(text: str, n: int):
    """A string column of `n` copies of `text`, from one buffer."""
    pa, raw = _pa(), text.encode()
    offsets = np.arange(n + 1, dtype=np.int64) * len(raw)
    return pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(raw * n))


def null_bytes(n: int):
    """A byte[] column with no value (the property is absent)."""
    pa = _pa()
    return pa.nulls(n, type=pa.large_string())


def _column(name: str, kind: str, values: Any):
    pa = _pa()
    if kind == "byte[]" and not isinstance(values, (pa.Array, pa.ChunkedArray)):
        raise TypeError(f"{name}: byte[] columns are built with byte_rows")
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    types = {"string": pa.large_string(), "long": pa.int64(), "double": pa.float64()}
    return pa.array(values, type=types[kind])


class CsvWriter:
    """One importer input file, its header line then a group of rows at a time."""

    def __init__(self, path: Path, header: dict[str, tuple[str, str]]):
        """`header`: our column name -> (importer header, importer type)."""
        self.path = path
        self.header = header
        self._file = None
        self._writer = None
        self.rows = 0
        self.line_breaks = False  # whether a string field holds CR or LF: the importer must read it multi-line

    def write(self, columns: dict[str, Any]) -> None:
        pa = _pa()
        table = pa.table({head: _column(name, kind, columns[name]) for name, (head, kind) in self.header.items()})
        if self._writer is None:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed in close()
            self._file.write((",".join(head for head, _ in self.header.values()) + "\n").encode())
            self._writer = pa.csv.CSVWriter(self._file, table.schema,
                                            write_options=pa.csv.WriteOptions(include_header=False))
        self._writer.write_table(table)
        self.rows += table.num_rows
        if not self.line_breaks:
            import pyarrow.compute as pc

            self.line_breaks = any(pc.any(pc.match_substring_regex(table[head], "[\r\n]")).as_py()
                                   for name, (head, kind) in self.header.items() if kind == "string")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "CsvWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def sample_writer(path: Path) -> CsvWriter:
    header = {"id": (f"id:ID({ID_GROUP})", "string"), "label": (":LABEL", "string")}
    header.update({name: (f"{name}:{kind}", kind) for name, kind in SAMPLE_COLUMNS.items() if name != "id"})
    return CsvWriter(path, header)


def edge_writer(path: Path, weighted: bool = True) -> CsvWriter:
    """SIMILAR edges carry weight and rank; CONFLICT edges (`weighted=False`) none, as `sync_conflict` writes them."""
    header = {"source": (f":START_ID({ID_GROUP})", "string"), "target": (f":END_ID({ID_GROUP})", "string"),
              "type": (":TYPE", "string")}
    if weighted:
        header.update({"weight": ("weight:double", "double"), "rank": ("rank:long", "long")})
    return CsvWriter(path, header)


def write_edges(writer: CsvWriter, kind: str, ids: np.ndarray, index: np.ndarray, weight: np.ndarray,
                rows: Iterable[np.ndarray], negative_only: bool = False) -> int:
    """The edges `sync_similar` / `sync_conflict` would write for these rows: weight = exact cosine, rank =
    position in the list, when the writer has those columns (CONFLICT: neither, and only for negative
    cosines). Returns how many were written."""
    pa = _pa()
    names = pa.array(ids, type=pa.large_string())  # once: each edge then takes its ends by position
    written = 0
    for part in rows:
        idx, w = index[part], weight[part]
        rank = np.broadcast_to(np.arange(idx.shape[1]), idx.shape)
        keep = w < 0 if negative_only else np.ones(idx.shape, dtype=bool)
        source = np.broadcast_to(part[:, None], idx.shape)[keep]
        if not len(source):
            continue
        columns = {"source": names.take(pa.array(source)), "target": names.take(pa.array(idx[keep])),
                   "type": repeated(kind, len(source))}
        if "weight" in writer.header:
            columns.update(weight=w[keep], rank=rank[keep])
        writer.write(columns)
        written += len(source)
    return written
