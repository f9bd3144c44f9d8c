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

import numpy as np
import torch

from g2is_graph.config import ProjectorConfig

PHILOX_SALT = 0x6732_4973_5F70_726F  # separates projector streams from other Philox uses of the same seed


def _stream(seed: int, block: int) -> np.random.Philox:
    return np.random.Philox(key=[seed & (2**64 - 1), PHILOX_SALT], counter=[0, 0, 0, block])


class Projector:
    """Projects [B, in_dim] float32 rows to [B, dim] float32 rows."""

    def __init__(self, config: ProjectorConfig, in_dim: int, device: str = "cpu", cache_bytes: int = 1 << 30):
        self.config = config
        self.in_dim = int(in_dim)
        self.device = torch.device(device)
        self.cache_bytes = cache_bytes
        self._cache: dict[int, object] = {}
        self._cached_bytes = 0

    @property
    def dim(self) -> int:
        return self.config.dim

    def identity(self) -> dict:
        """What makes two projectors produce the same features; stored with every feature store."""
        ident = {"kind": self.config.kind, "dim": self.config.dim, "seed": self.config.seed,
                 "in_dim": self.in_dim, "generator": "numpy-philox-v1"}
        if self.config.kind == "sparse":
            ident["sparse_nnz"] = self.config.sparse_nnz
        else:
            ident["block_rows"] = self.config.block_rows
        return ident

    def _blocks(self):
        rows = self.config.block_rows
        for b in range(math.ceil(self.in_dim / rows)):
            yield b, b * rows, min(self.in_dim, (b + 1) * rows)

    def _remember(self, key: int, value, nbytes: int):
        if self._cached_bytes + nbytes <= self.cache_bytes:
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
    def sparse_block(self, block: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Output coordinates [n_rows, nnz] (int64) and values [n_rows, nnz] (float32) of a row block."""
        nnz, k = self.config.sparse_nnz, self.config.dim
        words = _stream(self.config.seed, block).random_raw(n_rows * nnz).reshape(n_rows, nnz)
        columns = (words % np.uint64(k)).astype(np.int64)
        signs = np.where((words >> np.uint64(63)) == 1, 1.0, -1.0).astype(np.float32) / np.float32(math.sqrt(nnz))
        return columns, signs

    def _sparse_tensors(self, block: int, n_rows: int):
        if block in self._cache:
            return self._cache[block]
        columns, signs = self.sparse_block(block, n_rows)
        value = (torch.from_numpy(columns).to(self.device), torch.from_numpy(signs).to(self.device))
        return self._remember(block, value, columns.nbytes + signs.nbytes)

    # -- projecting ------------------------------------------------------------------------
    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """[B, in_dim] -> [B, dim], accumulated in float32 on the projector's device."""
        if rows.ndim != 2 or rows.shape[1] != self.in_dim:
            raise ValueError(f"expected [B, {self.in_dim}] rows, got {tuple(rows.shape)}")
        rows = rows.to(self.device, torch.float32)
        out = torch.zeros(rows.shape[0], self.dim, dtype=torch.float32, device=self.device)
        for block, start, stop in self._blocks():
            part = rows[:, start:stop]
            if self.config.kind == "sparse":
                columns, signs = self._sparse_tensors(block, stop - start)
                contributions = (part.unsqueeze(-1) * signs).reshape(rows.shape[0], -1)
                out.index_add_(1, columns.reshape(-1), contributions)
            else:
                out.addmm_(part, self._dense_tensor(block, stop - start))
        return out

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
