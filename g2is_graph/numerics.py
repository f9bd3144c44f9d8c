"""Dot products that do not depend on the CPU, the BLAS, the device or how rows were batched.

A BLAS product's last bits depend on its kernel (AVX2 or AVX-512, MKL or OpenBLAS, cuBLAS) and on the
blocking it chose for the matrix shape, so the same pair of vectors can get two different float32
cosines in two builds that saw the rows in different batches. Every value the graph stores or the
walk decides on is therefore computed here: each product of two float32 numbers is exact in float64
(24 + 24 bits < 53), and the d products are summed in one fixed pairwise tree of elementwise IEEE
additions, which every machine rounds the same way. BLAS products stay the fast filter in front: the
candidates they find are widened by a rigorous bound on their rounding (`float32_dot_error`) before
the exact values decide, so the result is the one an exact search would give.
"""

from __future__ import annotations

import heapq
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

FLOAT32_UNIT = 2.0 ** -24
FLOAT64_UNIT = 2.0 ** -53
CHUNK_NUMBERS = 1 << 16  # float64 products (512 KiB, cache-sized) summed per pass
GATHER_NUMBERS = 1 << 22  # float32 candidate vectors (16 MiB) gathered per task of exact_candidate_dots


def _tree_sum_inplace(products: np.ndarray) -> np.ndarray:
    """Sum over the last axis (a power of two long, zero padded) in a fixed pairwise order, in place."""
    half = products.shape[-1]
    while half > 1:
        half //= 2
        np.add(products[..., :half], products[..., half:2 * half], out=products[..., :half])
    return products[..., 0].copy()


def exact_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Fixed-order float64 dot products of a [..., d] and b [..., d] (broadcast), the same on every machine."""
    a, b = np.asarray(a), np.asarray(b)
    shape = np.broadcast_shapes(a.shape, b.shape)
    dim = shape[-1]
    size = 1 << max(0, (dim - 1).bit_length())  # zero padding is exact
    if len(shape) == 1:
        buffer = np.zeros(size)
        np.multiply(a, b, out=buffer[:dim], dtype=np.float64)
        return _tree_sum_inplace(buffer)[()]
    a, b = np.broadcast_to(a, shape), np.broadcast_to(b, shape)
    inner = int(np.prod(shape[1:-1], dtype=np.int64))
    step = max(1, CHUNK_NUMBERS // (inner * size))
    buffer = np.zeros((min(step, shape[0]),) + shape[1:-1] + (size,))
    out = np.empty(shape[:-1])
    for start in range(0, shape[0], step):
        stop = min(start + step, shape[0])
        products = buffer[:stop - start]
        np.multiply(a[start:stop], b[start:stop], out=products[..., :dim], dtype=np.float64)
        out[start:stop] = _tree_sum_inplace(products)
    return out


def exact_candidate_dots(queries: np.ndarray, base: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """exact_dots of each query row i with the base rows candidates[i] ([B, C]), gathering a few MiB of
    candidate vectors at a time, on as many threads as torch uses (numpy releases the GIL in ufuncs)."""
    import torch

    out = np.empty(candidates.shape)
    step = max(1, GATHER_NUMBERS // max(1, candidates.shape[1] * base.shape[1]))

    def part(start: int) -> None:
        stop = start + step
        out[start:stop] = exact_dots(base[candidates[start:stop]], queries[start:stop, None, :])

    starts = range(0, len(candidates), step)
    threads = max(1, min(torch.get_num_threads(), len(starts)))
    if threads == 1:
        for start in starts:
            part(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(part, starts))
    return out


def exact_matvec(rows: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """exact_dots of every row of [n, d] with one [d] vector."""
    return exact_dots(rows, np.asarray(vector)[None, :])


def row_norms(rows: np.ndarray, block: int = 16384) -> np.ndarray:
    """np.linalg.norm(rows, axis=1), the same values, a block of rows at a time: the one-call form builds an
    [n, d] temporary of squares (3.8 GiB for 1M x 1024 float32; issue 19)."""
    out = np.empty(len(rows), dtype=rows.dtype if rows.dtype.kind == "f" else np.float64)
    for start in range(0, len(rows), block):
        out[start:start + block] = np.linalg.norm(rows[start:start + block], axis=1)
    return out


def exact_norm(vector: np.ndarray) -> float:
    return float(np.sqrt(exact_dots(vector, vector)))


def float32_dot_error(dim: int, norm_product: float | np.ndarray = 1.0) -> float | np.ndarray:
    """A bound on |BLAS float32 dot - true dot| for any summation order, blocking or FMA use:
    gamma_d * sum |x_i y_i| <= gamma_d * |x| |y| (Higham, Accuracy and Stability, 3.1), plus the
    rounding of the exact-value side, so that a float32 filter never drops what the exact values keep."""
    gamma = dim * FLOAT32_UNIT / (1 - dim * FLOAT32_UNIT)
    return gamma * norm_product + exact_dot_error(dim, norm_product)


def float64_dot_error(dim: int, norm_product: float | np.ndarray = 1.0) -> float | np.ndarray:
    """The same bound for a BLAS float64 dot product."""
    gamma = dim * FLOAT64_UNIT / (1 - dim * FLOAT64_UNIT)
    return gamma * norm_product + exact_dot_error(dim, norm_product)


def exact_dot_error(dim: int, norm_product: float | np.ndarray = 1.0) -> float | np.ndarray:
    """A bound on |exact_dots - true dot|: the products of float32 inputs are exact, a pairwise tree of
    depth ceil(log2 d) rounds each partial sum once per level (products of float64 inputs add one more)."""
    depth = max(1, int(dim - 1).bit_length()) + 1
    return 2 * depth * FLOAT64_UNIT * norm_product


def unit_filter_error(dim: int) -> float:
    """Bound on |float32 BLAS cosine - exact_dots| for vectors of norm at most 1.001 (stored unit vectors,
    unit components), including the rounding of a float64 operand to float32 for the product."""
    return float(float32_dot_error(dim, 1.001 ** 2)) + 4 * FLOAT32_UNIT


def top_exact(approx: np.ndarray, error: float | np.ndarray, n: int, exact, keys: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
    """Positions and values of the n largest exact scores, equal scores by key (default: position), from
    approximate scores within `error` of them: only the band that could reach the top n is scored
    exactly (`exact(positions)` returns their exact scores). Correct for any rounding of `approx` within
    the bound, so the result is the same on every machine."""
    approx = np.asarray(approx)
    n = min(n, len(approx))
    if n <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    threshold = np.partition(approx, len(approx) - n)[len(approx) - n]
    band = np.flatnonzero(approx >= threshold - 2 * np.asarray(error))
    values = np.asarray(exact(band), dtype=np.float64)
    keys = band if keys is None else np.asarray(keys)[band]
    order = np.lexsort((keys, -values))[:n]
    return band[order], values[order]


def exact_descending(pages, error: float):
    """Items in descending exact value (equal values by ascending key) from pages that arrive in descending
    approximate order: each page is (approx, keys, exact values, items), approx within `error` of the
    exact values. An item is released once nothing not yet fetched can precede it, so a consumer that
    stops early reads only the pages it needs. Yields (exact value, item)."""
    heap: list[tuple[float, Any, int, Any]] = []
    floor = np.inf  # approximate value of the last item fetched: nothing unfetched is above it
    counter = 0
    pages = iter(pages)
    while True:
        page = None if floor == -np.inf else next(pages, None)
        if page is None:
            floor = -np.inf
        else:
            approx, keys, values, items = page
            for key, value, item in zip(keys, values, items):
                heapq.heappush(heap, (-float(value), key, counter, item))
                counter += 1
            if len(approx):
                floor = float(np.min(approx))
        while heap and -heap[0][0] > floor + error:
            value, _, _, item = heapq.heappop(heap)
            yield -value, item
        if floor == -np.inf and not heap:
            return
