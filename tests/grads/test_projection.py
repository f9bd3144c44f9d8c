"""The projector: entries fixed by (seed, input index, output index); same output for any chunking/device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from g2is_graph.config import ProjectorConfig
from g2is_graph.grads.projection import Projector

KINDS = ["rademacher", "gaussian", "sparse"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("kind", KINDS)
def test_matrix_rows_do_not_depend_on_how_many_rows_are_asked_for(kind):
    small = Projector(ProjectorConfig(kind=kind, dim=96, block_rows=64), in_dim=100).matrix()
    large = Projector(ProjectorConfig(kind=kind, dim=96, block_rows=64), in_dim=300).matrix()
    np.testing.assert_array_equal(small, large[:100])  # rows 0..99 identical: a longer input only adds rows
    other_seed = Projector(ProjectorConfig(kind=kind, dim=96, block_rows=64, seed=1), in_dim=100).matrix()
    assert not np.array_equal(small, other_seed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
def test_projection_is_the_matrix_product_for_any_batch_chunking(kind, device):
    config = ProjectorConfig(kind=kind, dim=128, block_rows=50)
    rows = torch.randn(10, 210, generator=torch.Generator().manual_seed(0))
    projector = Projector(config, 210, device=device)
    whole = projector.project(rows).cpu().numpy()
    uncached = Projector(config, 210, device=device, cache_bytes=0)
    pieces = np.concatenate([uncached.project(rows[i:i + 3]).cpu().numpy() for i in range(0, 10, 3)])
    expected = rows.numpy().astype(np.float64) @ projector.matrix().astype(np.float64)
    np.testing.assert_allclose(whole, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(pieces, whole, rtol=1e-6, atol=1e-6)
    cpu = Projector(config, 210, device="cpu").project(rows).numpy()
    np.testing.assert_allclose(whole, cpu, rtol=1e-5, atol=1e-5)  # CPU and CUDA agree to float rounding


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cache_bytes", [None, 0])
def test_pieces_at_their_absolute_positions_sum_to_the_projection_of_the_whole(kind, device, cache_bytes):
    # pieces cut like LoRA weights: not aligned to the generator's row blocks, some inside one block
    config = ProjectorConfig(kind=kind, dim=96, block_rows=64)
    rows = torch.randn(3, 500, generator=torch.Generator().manual_seed(1))
    projector = Projector(config, 500, device=device, cache_bytes=cache_bytes)
    expected = rows.numpy().astype(np.float64) @ projector.matrix().astype(np.float64)
    for cuts in ([0, 500], [0, 10, 70, 71, 200, 500], [0, 130, 131, 260, 390, 450, 500]):
        out = torch.zeros(3, 96, device=device)
        for start, stop in reversed(list(zip(cuts, cuts[1:]))):  # any order, as a backward pass hands them over
            projector.project_into(out, rows[:, start:stop].to(device), start)
        np.testing.assert_allclose(out.cpu().numpy(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="cannot add"):
        projector.project_into(torch.zeros(3, 96, device=device), rows[:, :20].to(device), 490)


@pytest.mark.parametrize("dim", [96, 2**15])
def test_sparse_cache_holds_three_bytes_per_non_zero_and_keeps_the_matrix(dim):
    # an int8 sign and a column: int16 below 2**15 output dims, int32 from there
    config = ProjectorConfig(kind="sparse", dim=dim, block_rows=64)
    rows = torch.randn(2, 300, generator=torch.Generator().manual_seed(2))
    projector = Projector(config, 300)
    out = projector.project(rows).numpy()
    expected = rows.numpy().astype(np.float64) @ projector.matrix().astype(np.float64)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
    per_entry = 1 + (2 if dim < 2**15 else 4)
    assert projector._cached_bytes == 300 * config.sparse_nnz * per_entry


@pytest.mark.parametrize("kind", KINDS)
def test_johnson_lindenstrauss_norms_and_cosines(kind):
    rng = np.random.default_rng(3)
    base = rng.standard_normal((5, 2000))
    x = np.concatenate([base + 0.3 * rng.standard_normal((5, 2000)) for _ in range(8)]).astype(np.float32)
    projector = Projector(ProjectorConfig(kind=kind, dim=1024), 2000)
    y = projector.project(torch.tensor(x)).numpy()
    ratio = np.linalg.norm(y, axis=1) / np.linalg.norm(x, axis=1)
    assert abs(ratio.mean() - 1) < 0.02 and ratio.std() < 0.06

    def cos(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return a @ a.T

    error = np.abs(cos(y) - cos(x))
    assert error.mean() < 0.03 and error.max() < 0.15


def test_identity_names_everything_that_changes_the_matrix():
    ident = Projector(ProjectorConfig(kind="rademacher", dim=64, seed=5, block_rows=32), 100).identity()
    assert ident == {"kind": "rademacher", "dim": 64, "seed": 5, "in_dim": 100, "generator": "numpy-philox-v1",
                     "block_rows": 32}
    # sparse stores written before block_rows was recorded all used 4096: their identity stays as it was
    assert Projector(ProjectorConfig(kind="sparse", dim=64), 100).identity() == {
        "kind": "sparse", "dim": 64, "seed": 0, "in_dim": 100, "generator": "numpy-philox-v1", "sparse_nnz": 1}
    assert Projector(ProjectorConfig(kind="sparse", dim=64, block_rows=32), 100).identity()["block_rows"] == 32
    with pytest.raises(ValueError, match="expected"):
        Projector(ProjectorConfig(dim=8), 10).project(torch.zeros(2, 11))
