"""The importer's CSV text, checked against a plain reading of it: byte[] fields give back every byte, strings
and floats come back from pyarrow's CSV reader as written (the import itself: tests/ingest/test_graph_import.py)."""

from __future__ import annotations

import numpy as np
import pyarrow.csv as pc

from g2is_graph.db.bulk import byte_rows, edge_writer, repeated, sample_writer, write_edges


def test_byte_rows_spell_every_byte_value_and_give_back_the_floats():
    every = np.arange(-128, 128, dtype=np.int8).view(np.uint8).reshape(8, 32).view("<f4")
    rows = byte_rows(every, "<f4").to_pylist()
    for row, text in zip(every, rows):
        numbers = text.split(";")
        assert all(len(n) == 4 for n in numbers[1:]) and len(numbers[0]) == 5  # fixed width
        assert np.array([int(n) for n in numbers], dtype=np.int8).view("<f4").tobytes() == row.tobytes()
    doubles = np.random.default_rng(0).standard_normal((3, 5))
    back = [np.array([int(n) for n in t.split(";")], dtype=np.int8).view("<f8") for t in byte_rows(doubles, "<f8")
            .to_pylist()]
    assert np.array_equal(np.stack(back), doubles)
    assert len(byte_rows(doubles[:0], "<f8")) == 0


def test_csv_files_hold_what_was_written(tmp_path):
    ids = np.array(['a "quoted", id', "b\nline", "c"], dtype=object)
    with sample_writer(tmp_path / "s.csv") as nodes:
        nodes.write({"id": ids, "label": repeated("Sample", 3), "space": repeated("sp", 3), "row": np.arange(3),
                     "source_file": ["f.jsonl"] * 3, "line": [1, 2, 3], "dataset": ["", "d", None],
                     "content_hash": ["h"] * 3, "n_tokens": [1, 2, 3], "n_loss_tokens": [1, 1, 1],
                     "preview": ["x;y", "two\r\nlines", "naïve ✓"], "gradient_f32": byte_rows(np.eye(3, 2), "<f4"),
                     "validation_key": [None] * 3, "validation_dots": byte_rows(np.ones((3, 1)), "<f8")})
    assert nodes.line_breaks  # the importer is told to read multi-line
    table = pc.read_csv(tmp_path / "s.csv", parse_options=pc.ParseOptions(newlines_in_values=True),
                        convert_options=pc.ConvertOptions(strings_can_be_null=True, quoted_strings_can_be_null=False))
    assert table.column_names[:3] == ["id:ID(Sample)", ":LABEL", "space:string"]
    assert table["id:ID(Sample)"].to_pylist() == list(ids)
    assert table["dataset:string"].to_pylist() == ["", "d", None]  # quoted empty string, unquoted null
    assert table["preview:string"].to_pylist() == ["x;y", "two\r\nlines", "naïve ✓"]
    weight = np.array([0.1, -1 / 3, 2.0 ** -40])
    with edge_writer(tmp_path / "e.csv") as edges:
        n = write_edges(edges, "SIMILAR", ids, np.array([[1], [2], [0]]), weight[:, None], [np.arange(3)])
    assert n == 3 and edges.line_breaks
    with edge_writer(tmp_path / "plain.csv") as plain:
        write_edges(plain, "SIMILAR", np.array(["a", "b"], dtype=object), np.array([[1], [0]]), np.ones((2, 1)),
                    [np.arange(2)])
    assert not plain.line_breaks
    table = pc.read_csv(tmp_path / "e.csv", parse_options=pc.ParseOptions(newlines_in_values=True))
    assert table["weight:double"].to_pylist() == weight.tolist()  # float64 round-trips exactly
    assert table[":END_ID(Sample)"].to_pylist() == [ids[1], ids[2], ids[0]]
    assert table[":TYPE"].to_pylist() == ["SIMILAR"] * 3 and table["rank:long"].to_pylist() == [0, 0, 0]
