"""Random projections whose entries depend only on (seed, input index, output index).

The matrix is generated on the CPU with numpy's counter-based Philox generator, in row blocks at fixed
absolute positions (block b covers input rows [b*block_rows, (b+1)*block_rows) and is drawn from the
stream keyed by (seed, b)). The same entries therefore come out on any device, for any batch size and
however the gradient is chunked; only the float rounding of the matrix product differs between devices.
TRAK's CUDA projector, by contrast, seeds per tile of the GPU's multiprocessor count (see docs).

Kinds: `rademacher` (+-1/sqrt(k)), `gaussian` (N(0, 1/k)), and `sparse` (a sparse JL transform: each
input coordinate goes to `sparse_nnz` output coordinates with sign +-1/sqrt(nnz); O(D * nnz) per example
instead of O(D * k), with the same JL guarantee up to constants; its error is measured in bench/).
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch

from g2is_graph.config import ProjectorConfig

PHILOX_SALT = 0x6732_4973_5F70_726F  # separates projector streams from other Philox uses of the same seed
SPARSE_BLOCK_ROWS = 4096  # the block size every sparse store before issue 17 used (its identity did not say)


def _stream(seed: int, block: int) -> np.random.Philox:
    return np.random.Philox(key=[seed & (2**64 - 1), PHILOX_SALT], counter=[0, 0, 0, block])


class Projector:
    """Projects [B, in_dim] float32 rows to [B, dim] float32 rows."""

    def __init__(self, config: ProjectorConfig, in_dim: int, device: str = "cpu", cache_bytes: int | None = None):
        self.config = config
        self.in_dim = int(in_dim)
        self.device = torch.device(device)
        self.cache_bytes = config.cache_mb << 20 if cache_bytes is None else cache_bytes
        self._cache: dict[object, object] = {}
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()  # streams in several threads share one projector

    @property
    def dim(self) -> int:
        return self.config.dim

    def identity(self) -> dict:
        """What makes two projectors produce the same features; stored with every feature store."""
        ident = {"kind": self.config.kind, "dim": self.config.dim, "seed": self.config.seed,
                 "in_dim": self.in_dim, "generator": "numpy-philox-v1"}
        if self.config.kind == "sparse":
            ident["sparse_nnz"] = self.config.sparse_nnz
            if self.config.block_rows != SPARSE_BLOCK_ROWS:  # older stores omit it: they all used 4096
                ident["block_rows"] = self.config.block_rows
        else:
            ident["block_rows"] = self.config.block_rows
        return ident

    def _blocks(self):
        rows = self.config.block_rows
        for b in range(math.ceil(self.in_dim / rows)):
            yield b, b * rows, min(self.in_dim, (b + 1) * rows)

    def _pieces(self, start: int, stop: int):
        """(block, first row of the block, lo, hi) for each generator block that input rows [start, stop) touch."""
        rows = self.config.block_rows
        for block in range(start // rows, -(-stop // rows)):
            first = block * rows
            yield block, first, max(start, first), min(stop, first + rows)

    @property
    def _sparse_value(self) -> np.float32:
        """|entry| of the sparse matrix: 1/sqrt(nnz) rounded to float32 once, the same on every path."""
        return np.float32(1.0) / np.float32(math.sqrt(self.config.sparse_nnz))

    def _remember(self, key, value, nbytes: int):
        with self._cache_lock:
            if key not in self._cache and self._cached_bytes + nbytes <= self.cache_bytes:
                self._cache[key] = value
                self._cached_bytes += nbytes
        return value

    # -- dense -----------------------------------------------------------------------------
    def dense_block(self, block: int, n_rows: int) -> np.ndarray:
        """Rows [block*block_rows, block*block_rows + n_rows) of the matrix, float32, [n_rows, dim]."""
        k = self.config.dim
        generator = _stream(self.config.seed, block)
        if self.config.kind == "rademacher":
            n_bits = n_rows * k
            words = generator.random_raw(-(-n_bits // 64))
            bits = np.unpackbits(words.view(np.uint8))[:n_bits].reshape(n_rows, k)
            return (bits.astype(np.float32) * 2.0 - 1.0) / np.float32(math.sqrt(k))
        normal = np.random.Generator(generator).standard_normal(n_rows * k, dtype=np.float32)
        return normal.reshape(n_rows, k) / np.float32(math.sqrt(k))

    def _dense_tensor(self, block: int, n_rows: int) -> torch.Tensor:
        if block in self._cache:
            return self._cache[block]
        matrix = torch.from_numpy(self.dense_block(block, n_rows)).to(self.device)
        return self._remember(block, matrix, matrix.numel() * 4)

    # -- sparse ----------------------------------------------------------------------------
    def _sparse_words(self, block: int, n_rows: int) -> np.ndarray:
        """The raw draws [n_rows, nnz] of a row block: column = word mod dim, sign = + when the top bit is set."""
        nnz = self.config.sparse_nnz
        return _stream(self.config.seed, block).random_raw(n_rows * nnz).reshape(n_rows, nnz)

    def _columns(self, words: np.ndarray) -> np.ndarray:
        k = self.config.dim
        if k & (k - 1) == 0:  # a power of two: the same remainder, without a 64-bit division per entry
            return words & np.uint64(k - 1)
        return words % np.uint64(k)

    def sparse_block(self, block: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Output coordinates [n_rows, nnz] (int64) and values [n_rows, nnz] (float32) of a row block."""
        words = self._sparse_words(block, n_rows)
        value = self._sparse_value
        signs = np.where((words >> np.uint64(63)) == 1, value, -value).astype(np.float32)
        return self._columns(words).astype(np.int64), signs

    # -- projecting ------------------------------------------------------------------------
    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] -> [B, dim], accumulated in float32 on the projector's device."""
        if rows.ndim != 2 or rows.shape[1] != self.in_dim:
            raise ValueError(f"expected [B, {self.in_dim}] rows, got {tuple(rows.shape)}")
        out = torch.zeros(rows.shape[0], self.dim, dtype=torch.float32, device=self.device)
        self.project_into(out, rows, 0)
        return out

    def project_into(self, out: torch.Tensor, part: torch.Tensor, start: int) -> None:
        """out += part @ M[start:start + n]: `part` [B, n] holds input coordinates [start, start + n).

        The matrix rows sit at fixed absolute positions, so projecting the pieces of any partition of the
        input and summing equals projecting the whole vector (up to float rounding): one LoRA weight's
        per-example gradient can be projected as soon as it exists, and no [B, in_dim] matrix is needed."""
        stop = start + part.shape[1]
        if part.ndim != 2 or start < 0 or stop > self.in_dim or out.shape != (part.shape[0], self.dim):
            raise ValueError(f"cannot add a {tuple(part.shape)} piece at input {start} of {self.in_dim} "
                             f"into {tuple(out.shape)}")
        part = part.to(self.device, torch.float32)
        if self.config.kind == "sparse":
            columns, signs = self._sparse_range(start, stop)
            for column, sign in zip(columns, signs):  # one index_add per non-zero: ~9x faster on a CPU than one of nnz * n
                out.index_add_(1, column.long(), part * sign, alpha=float(self._sparse_value))
            return
        for block, first, lo, hi in self._pieces(start, stop):
            matrix = self._dense_tensor(block, min(self.in_dim, first + self.config.block_rows) - first)
            out.addmm_(part[:, lo - start:hi - start], matrix[lo - first:hi - first])

    def _sparse_range(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Input rows [start, stop) as output columns (int16 below 2**15 output dims, else int32) and int8 signs,
        both [nnz, n].

        3 bytes per non-zero instead of 12 (an int64 column and a float32 value): 42 MiB for SmolLM2 at LoRA
        r=128 with one non-zero. The int8 sign multiplies straight into a float32 product and |entry| is the
        index_add's alpha (index_add wants int64 columns: widening them costs less than decoding a folded sign,
        and an int32 index takes a slow path 40x slower); the features are bit for bit those of the float32
        matrix (a product by +-1 is exact)."""
        key = ("range", start, stop)
        if key in self._cache:
            return self._cache[key]
        words = np.concatenate([self._sparse_words(block, hi - first)[lo - first:]  # rows are a prefix of the block
                                for block, first, lo, hi in self._pieces(start, stop)]).T
        column_type = np.int16 if self.config.dim < 2**15 else np.int32
        signs = (words >> np.uint64(63)).astype(np.int8)
        value = tuple(torch.from_numpy(np.ascontiguousarray(a)).to(self.device) for a in (
            self._columns(words).astype(column_type), signs * 2 - 1))
        return self._remember(key, value, sum(a.numel() * a.element_size() for a in value))

    def matrix(self) -> np.ndarray:
        """The whole matrix [in_dim, dim] (small in_dim only: tests and error measurements)."""
        full = np.zeros((self.in_dim, self.dim), dtype=np.float32)
        for block, start, stop in self._blocks():
            if self.config.kind == "sparse":
                columns, signs = self.sparse_block(block, stop - start)
                np.add.at(full, (np.repeat(np.arange(start, stop), columns.shape[1]), columns.reshape(-1)),
                          signs.reshape(-1))
            else:
                full[start:stop] = self.dense_block(block, stop - start)
        return full
