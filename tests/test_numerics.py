"""Fixed-order dot products and the exact selections built on them, against correctly rounded sums and
against float32 filters rounded adversarially (within their bound), as another BLAS would round them."""

from __future__ import annotations

import math

import numpy as np

from g2is_graph.numerics import (
    exact_descending,
    exact_dot_error,
    exact_dots,
    exact_matvec,
    float32_dot_error,
    top_exact,
    unit_filter_error,
)


def unit_rows(n, d, seed=0):
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_exact_dots_are_within_their_bound_of_the_correctly_rounded_sum_and_do_not_depend_on_the_batch():
    x = unit_rows(40, 1000)
    alone = np.array([exact_dots(x[i], x[j]) for i in range(5) for j in range(40)]).reshape(5, 40)
    batched = exact_dots(x[:5, None, :], x[None, :, :])
    np.testing.assert_array_equal(alone, batched)  # bit for bit, whatever the batch shape
    np.testing.assert_array_equal(batched, exact_dots(x[None, :, :], x[:5, None, :]))  # symmetric
    np.testing.assert_array_equal(exact_matvec(x, x[3]), exact_dots(x, x[3]))
    fsum = np.array([[math.fsum(np.multiply(x[i], x[j], dtype=np.float64)) for j in range(40)] for i in range(5)])
    assert np.abs(batched - fsum).max() <= exact_dot_error(1000)
    assert (np.abs(x[:5] @ x.T - fsum) <= float32_dot_error(1000)).all()


def adversarial(values, bound, seed):
    return values + np.random.default_rng(seed).uniform(-0.9, 0.9, len(values)) * bound


def test_top_exact_finds_the_exact_top_n_from_any_rounding_of_the_filter():
    x = unit_rows(500, 64, seed=1)
    direction = x[0].astype(np.float64)
    exact = exact_matvec(x, direction)
    exact[100:110] = exact[7]  # equal scores: ordered by key
    keys = np.random.default_rng(3).permutation(500)
    expected = np.lexsort((keys, -exact))[:25]
    bound = unit_filter_error(64)
    for seed in range(5):
        rows, values = top_exact(adversarial(exact, bound, seed), bound, 25, lambda pos: exact[pos], keys)
        np.testing.assert_array_equal(rows, expected)
        np.testing.assert_array_equal(values, exact[expected])


def test_exact_descending_releases_the_exact_order_page_by_page():
    rng = np.random.default_rng(4)
    exact = np.round(rng.uniform(-1, 1, 300), 3)  # many equal values
    keys = np.arange(300)
    bound = 2e-3
    approx = adversarial(exact, bound, 5)
    order = np.argsort(-approx, kind="stable")
    fetched = []

    def pages(size=17):
        for start in range(0, 300, size):
            rows = order[start:start + size]
            fetched.append(len(rows))
            yield approx[rows], keys[rows], exact[rows], rows

    out = exact_descending(pages(), bound)
    first = [next(out) for _ in range(5)]
    assert sum(fetched) < 300  # a consumer that stops early reads only what it needs
    rest = list(out)
    released = [item for _, item in first + rest]
    np.testing.assert_array_equal(released, np.lexsort((keys, -exact)))
