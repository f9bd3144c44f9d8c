"""combined_features: the checkpoint-weighted vectors of chosen rows, read a chunk at a time."""

import tracemalloc

import numpy as np
import pytest

from g2is_graph.data.synthetic import synthetic_rows, synthetic_store
from g2is_graph.store.space import combined_features


def _unit(rng, n, d):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_rows_of_two_checkpoints_equal_the_whole_stores_gathered(tmp_path):
    rng = np.random.default_rng(0)
    rows = synthetic_rows(300)
    first = synthetic_store(tmp_path / "a", _unit(rng, 300, 24), rows, chunk_rows=64)
    second = synthetic_store(tmp_path / "b", _unit(rng, 300, 16), rows, checkpoint="c2", chunk_rows=50)
    weights = (0.3, 0.7)
    whole = np.concatenate([np.sqrt(w, dtype=np.float32) * s.load("normalized")
                            for s, w in zip((first, second), weights)], axis=1)
    taken = np.sort(rng.choice(300, size=117, replace=False))
    assert np.array_equal(combined_features([first, second], weights, taken), whole[taken])
    assert np.array_equal(combined_features([first, second], weights), whole)
    out = np.full((len(taken) + 5, 40), 7.0, dtype=np.float32)
    combined_features([first, second], weights, taken, out[5:])
    assert np.array_equal(out[5:], whole[taken]) and np.all(out[:5] == 7.0)
    assert np.array_equal(combined_features([first], (1.0,), taken), first.load("normalized")[taken])
    with pytest.raises(ValueError, match="sorted"):
        combined_features([first], (1.0,), taken[::-1])


def test_memory_is_the_result_and_one_chunk(tmp_path):
    """A pool's vectors are held once: loading the stores whole and gathering the rows held them twice."""
    rng = np.random.default_rng(1)
    n, d, chunk = 8192, 256, 256
    store = synthetic_store(tmp_path / "s", _unit(rng, n, d), synthetic_rows(n), chunk_rows=chunk)
    taken = np.arange(0, n, 2)
    tracemalloc.start()
    try:
        result = combined_features([store], (1.0,), taken)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    chunk_bytes = chunk * d * 4
    # a chunk's file blob, its raw and normalized tensors, their float32 copy and the gathered rows
    assert peak < result.nbytes + 8 * chunk_bytes
    assert peak < n * d * 4  # the whole store is never held
