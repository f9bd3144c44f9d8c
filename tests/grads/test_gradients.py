"""Batched per-example LoRA gradients against batch-size-1 autograd; the Adam feature against its formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import lora_model

from g2is_graph.config import DataConfig, LoraSettings
from g2is_graph.data.records import collate, encode_all, read_jsonl
from g2is_graph.grads.gradients import AdamState, PerExampleGradients, adam_feature, reference_gradient
from g2is_graph.model.loading import add_lora, load_base_model, load_tokenizer, lora_parameters


@pytest.fixture(scope="module")
def encoded(tiny_model, tmp_path_factory):
    from conftest import write_pool

    pool = write_pool(tmp_path_factory.mktemp("g") / "pool.jsonl", 9)
    tokenizer = load_tokenizer(tiny_model)
    _, encoded, _ = encode_all(read_jsonl(pool).records, tokenizer, DataConfig())
    assert len({e.n_tokens for e in encoded}) > 3  # lengths differ, so batches are padded
    return encoded, tokenizer.pad_token_id


@pytest.mark.parametrize("batch_size", [1, 2, 4, 9])
def test_batched_equals_batch_size_one_whatever_the_padding(tiny_model, encoded, batch_size):
    examples, pad_id = encoded
    model = lora_model(tiny_model)
    extractor = PerExampleGradients(model)
    reference = torch.stack([reference_gradient(model, torch.tensor([e.input_ids]), torch.tensor([e.labels]))
                             for e in examples])
    assert extractor.spec.dim == reference.shape[1]
    order = list(reversed(range(len(examples))))  # different batch compositions than the natural order
    rows = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        grads, losses = extractor.compute(*collate([examples[i] for i in idx], pad_id))
        rows.update(zip(idx, grads))
    batched = torch.stack([rows[i] for i in range(len(examples))])
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(batched, reference, rtol=1e-4, atol=1e-6)


def test_extra_padding_does_not_change_a_gradient(tiny_model, encoded):
    examples, pad_id = encoded
    model = lora_model(tiny_model)
    extractor = PerExampleGradients(model)
    alone, _ = extractor.compute(*collate(examples[:1], pad_id))
    ids, labels, attention = collate(examples[:1], pad_id)
    pad = 17
    ids = torch.cat([ids, torch.full((1, pad), pad_id)], 1)
    labels = torch.cat([labels, torch.full((1, pad), -100)], 1)
    attention = torch.cat([attention, torch.zeros((1, pad), dtype=torch.long)], 1)
    padded, _ = extractor.compute(ids, labels, attention)
    torch.testing.assert_close(padded, alone, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models_accumulate_in_float32(tiny_model, encoded, dtype):
    examples, pad_id = encoded
    model = lora_model(tiny_model, dtype)
    extractor = PerExampleGradients(model)
    grads, _ = extractor.compute(*collate(examples[:4], pad_id))
    assert grads.dtype == torch.float32 and torch.isfinite(grads).all()
    reference = torch.stack([reference_gradient(model, torch.tensor([e.input_ids]), torch.tensor([e.labels]))
                             for e in examples[:4]])
    cos = torch.nn.functional.cosine_similarity(grads, reference, dim=1)
    assert cos.min() > 0.99


def test_eval_mode_required(tiny_model, encoded):
    examples, pad_id = encoded
    model = lora_model(tiny_model).train()
    with pytest.raises(Exception, match="eval"):
        PerExampleGradients(model).compute(*collate(examples[:2], pad_id))


def test_adam_feature_matches_the_formula():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 50)).astype(np.float32)
    m = rng.standard_normal(50).astype(np.float32) * 0.1
    v = rng.random(50).astype(np.float32) * 0.01
    state = AdamState(torch.tensor(m), torch.tensor(v), step=7, beta1=0.9, beta2=0.999, eps=1e-8)
    m1 = 0.9 * m + 0.1 * g
    v1 = 0.999 * v + 0.001 * g * g
    less = m1 / np.sqrt(v1 + 1e-8)
    corrected = (m1 / (1 - 0.9 ** 8)) / (np.sqrt(v1 / (1 - 0.999 ** 8)) + 1e-8)
    np.testing.assert_allclose(adam_feature(torch.tensor(g), state, "less").numpy(), less, rtol=1e-5)
    np.testing.assert_allclose(adam_feature(torch.tensor(g), state, "corrected").numpy(), corrected, rtol=1e-5)
    # the two forms differ (bias correction is not a no-op at step 8)
    assert np.abs(less - corrected).max() > 1e-2


def test_loss_on_loss_positions_equals_the_full_logits_loss(tiny_model, encoded):
    from g2is_graph.grads.gradients import loss_token_losses, per_example_loss

    model = lora_model(tiny_model)
    examples, pad = encoded
    ids, labels, attention = collate(examples[:5], pad)
    full = per_example_loss(model(input_ids=ids, attention_mask=attention).logits, labels)
    torch.testing.assert_close(loss_token_losses(model, ids, labels, attention), full, rtol=1e-5, atol=1e-6)


def random_adam_state(dim: int, seed: int = 0) -> AdamState:
    g = torch.Generator().manual_seed(seed)
    return AdamState(torch.randn(dim, generator=g) * 0.01, torch.rand(dim, generator=g) * 1e-4, step=5,
                     beta1=0.9, beta2=0.999, eps=1e-8)


@pytest.mark.parametrize("kind", ["sparse", "rademacher"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_features_one_weight_at_a_time_equal_the_projection_of_the_whole_gradient(tiny_model, encoded, kind,
                                                                                   batch_size):
    from g2is_graph.config import ProjectorConfig
    from g2is_graph.grads.gradients import GradientFeaturizer
    from g2is_graph.grads.projection import Projector

    examples, pad_id = encoded
    model = lora_model(tiny_model)
    extractor = PerExampleGradients(model)
    reference = torch.stack([reference_gradient(model, torch.tensor([e.input_ids]), torch.tensor([e.labels]))
                             for e in examples])
    projector = Projector(ProjectorConfig(kind=kind, dim=64, block_rows=100), extractor.spec.dim)  # blocks cut weights
    state = random_adam_state(extractor.spec.dim)
    for adam, whole in ((None, reference), (state, adam_feature(reference, state))):
        featurizer = GradientFeaturizer(extractor, projector, adam)
        rows = []
        for start in range(0, len(examples), batch_size):
            features, losses, finite = featurizer.features(*collate(examples[start:start + batch_size], pad_id))
            assert finite.all() and features.shape == (len(losses), 64)
            rows.append(features)
        expected = projector.project(whole)
        torch.testing.assert_close(torch.cat(rows), expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())


def test_bfloat16_autocast_features_point_where_float32_ones_do(tiny_model, encoded):
    from g2is_graph.config import ProjectorConfig
    from g2is_graph.errors import GradientError
    from g2is_graph.grads.gradients import GradientFeaturizer
    from g2is_graph.grads.projection import Projector

    examples, pad_id = encoded
    extractor = PerExampleGradients(lora_model(tiny_model))
    projector = Projector(ProjectorConfig(dim=64), extractor.spec.dim)
    batch = collate(examples, pad_id)
    half, losses, finite = GradientFeaturizer(extractor, projector, autocast="bfloat16").features(*batch)
    exact, _, _ = GradientFeaturizer(extractor, projector, autocast="float32").features(*batch)  # merges the LoRA
    with pytest.raises(GradientError, match="merged"):  # bfloat16 products of merged weights would drop updates
        GradientFeaturizer(extractor, projector, autocast="bfloat16")
    assert half.dtype == torch.float32 and finite.all()
    assert not torch.equal(half, exact)  # the products really ran in bfloat16
    assert torch.nn.functional.cosine_similarity(half, exact, dim=1).min() > 0.99


def test_a_non_finite_gradient_is_flagged_for_its_example(tiny_model, encoded):
    from g2is_graph.config import ProjectorConfig
    from g2is_graph.grads.gradients import GradientFeaturizer
    from g2is_graph.grads.projection import Projector

    examples, pad_id = encoded
    model = lora_model(tiny_model)
    extractor = PerExampleGradients(model)
    state = random_adam_state(extractor.spec.dim)
    state.exp_avg_sq[extractor.offsets[3] + 5] = -1.0  # sqrt of a negative second moment: NaN in that coordinate
    featurizer = GradientFeaturizer(extractor, Projector(ProjectorConfig(dim=16), extractor.spec.dim), state)
    _, _, finite = featurizer.features(*collate(examples[:3], pad_id))
    assert not finite.any()


class LargestTensor:
    """Records the element count of the largest tensor any torch operation produces (backward hooks included)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        monitor = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        monitor.largest = max(monitor.largest, t.numel())
                return out

        self.largest = 0
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def map_large_blocks_alone() -> None:
    """Make glibc's malloc map every block over 128 KiB on its own and unmap it when freed (a fixed mmap
    threshold), so that the resident set follows the live tensors rather than what the heap kept."""
    import ctypes

    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD (fixing it also stops glibc raising it)


def peak_rss_growth(fn) -> int:
    """Bytes by which the process's peak resident set grows while fn runs (Linux: VmHWM reset, then read)."""
    def rss(field):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(field))

    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets VmHWM to the current resident set
    before = rss("VmRSS:")
    fn()
    return rss("VmHWM:") - before


def test_memory_is_bounded_by_one_weight_not_by_the_gradient_dimension(tmp_path):
    """A tiny model with a large LoRA (D = 5.5M numbers per example): a batch of 8 examples' gradients would
    be 176 MB as a [B, D] matrix; featurising holds one LoRA weight's [B, n] (n <= 131,072, three buffers of it:
    the gradient, Adam's second moment, one projection term) at a time. Short examples keep the activations
    (B x T x r per weight) small beside that."""
    from g2is_graph.config import ProjectorConfig
    from g2is_graph.grads.gradients import GradientFeaturizer
    from g2is_graph.grads.projection import Projector
    from g2is_graph.model.loading import build_tiny_model

    map_large_blocks_alone()
    folder = build_tiny_model(tmp_path / "m", hidden=256, layers=6)
    torch.manual_seed(0)
    model = add_lora(load_base_model(folder), LoraSettings(r=512, alpha=512, dropout=0.0))
    for name, p in lora_parameters(model):
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    tokenizer = load_tokenizer(folder)
    ids = torch.randint(3, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    batch = (ids, labels, torch.ones_like(ids))
    extractor = PerExampleGradients(model)
    d, n_max = extractor.spec.dim, max(int(np.prod(s)) for s in extractor.spec.shapes)
    materialised = 8 * d * 4
    assert d > 5_500_000 and tokenizer is not None
    projector = Projector(ProjectorConfig(kind="sparse", dim=256), d)  # its bounded cache fills in the first call
    featurizer = GradientFeaturizer(extractor, projector, random_adam_state(d))
    featurizer.features(*batch)

    with LargestTensor() as guard:
        streamed = peak_rss_growth(lambda: featurizer.features(*batch))
    assert guard.largest <= 8 * n_max  # no tensor larger than one weight's per-example gradients
    whole = peak_rss_growth(lambda: extractor.compute(*batch))  # what materialising the matrix costs
    bound = materialised // 4
    print(f"peak growth: featurising {streamed / 1e6:.1f} MB, materialising {whole / 1e6:.1f} MB, bound {bound / 1e6:.1f} MB")
    assert streamed < bound < whole, (streamed, bound, whole)


def test_base_bfloat16_runs_only_the_frozen_base_layers_in_bfloat16(tiny_model, encoded):
    from g2is_graph.errors import GradientError
    from g2is_graph.grads.gradients import bfloat16_base_layers

    examples, pad_id = encoded
    batch = collate(examples, pad_id)
    exact, _ = PerExampleGradients(lora_model(tiny_model)).compute(*batch)
    autocast, _ = PerExampleGradients(lora_model(tiny_model)).compute(*batch, autocast="bfloat16")
    model = lora_model(tiny_model)
    extractor = PerExampleGradients(model)
    with pytest.raises(GradientError, match="base-bfloat16 and the model's state go together"):
        extractor.compute(*batch, autocast="base-bfloat16")  # a float32 model asked for base-bfloat16
    converted = bfloat16_base_layers(model)
    assert converted == 2 * 7 + 1 and bfloat16_base_layers(model) == 0  # q k v o gate up down per layer, the head
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "embed_tokens" in n or "norm" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "base_layer" in n or "mlp" in n or "lm_head" in n)
    half, losses = extractor.compute(*batch, autocast="base-bfloat16")
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert not torch.equal(half, exact)  # the base products really ran in bfloat16
    cos = lambda a: torch.nn.functional.cosine_similarity(a, exact, dim=1)  # noqa: E731
    assert cos(half).min() > 0.999
    assert (1 - cos(half)).mean() < (1 - cos(autocast)).mean()  # closer to float32 than torch.autocast
    with pytest.raises(GradientError, match="base-bfloat16 and the model's state go together"):
        extractor.compute(*batch)  # float32 asked of a converted model: refused, not silently mixed


def test_a_merged_model_gives_the_gradients_of_the_unmerged_one(tiny_model, encoded):
    from g2is_graph.errors import GradientError
    from g2is_graph.grads.gradients import merge_lora

    examples, pad_id = encoded
    batch = collate(examples, pad_id)
    unmerged, losses = PerExampleGradients(lora_model(tiny_model)).compute(*batch)
    model = lora_model(tiny_model)
    assert merge_lora(model) == 2 * 4 and merge_lora(model) == 0  # q k v o in each of 2 layers, once
    merged, merged_losses = PerExampleGradients(model).compute(*batch)
    assert unmerged.abs().max() > 1e-3
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(merged_losses, losses)
    with pytest.raises(GradientError, match="not merged"):
        reference_gradient(model, torch.tensor([examples[0].input_ids]), torch.tensor([examples[0].labels]))


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while fn runs (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_the_gated_mlp_keeps_its_bfloat16_products_for_backward_and_gives_the_same_gradients(tiny_model, encoded):
    from g2is_graph.grads.gradients import bfloat16_base_layers

    examples, pad_id = encoded
    batch = collate(examples, pad_id)
    fused, plain = lora_model(tiny_model), lora_model(tiny_model)
    for model in (fused, plain):
        bfloat16_base_layers(model)
    mlps = [m for m in plain.modules() if type(m).__name__ == "LlamaMLP"]
    assert len(mlps) == 2 and all("forward" in m.__dict__ for m in mlps)
    for mlp in mlps:  # back to three cast layers and float32 elementwise products
        del mlp.forward
    results = {}
    for name, model in (("fused", fused), ("plain", plain)):
        extractor = PerExampleGradients(model)
        results[name] = extractor.compute(*batch, autocast="base-bfloat16")
        results[name + " saved"] = saved_bytes(lambda: extractor.compute(*batch, autocast="base-bfloat16"))
    torch.testing.assert_close(results["fused"][0], results["plain"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results["fused"][1], results["plain"][1], rtol=1e-6, atol=1e-7)
    tokens, intermediate = batch[0].numel(), mlps[0].gate_proj.out_features
    # three float32 [tokens, intermediate] activations per MLP become two bfloat16 ones
    assert results["plain saved"] - results["fused saved"] >= 2 * tokens * intermediate * (3 * 4 - 2 * 2)


def test_streams_in_threads_give_each_batch_the_features_it_gets_alone(tiny_model, encoded):
    from g2is_graph.config import ProjectorConfig
    from g2is_graph.grads.gradients import GradientFeaturizer, featurize_batches
    from g2is_graph.grads.projection import Projector

    examples, pad_id = encoded
    extractor = PerExampleGradients(lora_model(tiny_model))
    featurizer = GradientFeaturizer(extractor, Projector(ProjectorConfig(dim=64), extractor.spec.dim),
                                    random_adam_state(extractor.spec.dim), autocast="base-bfloat16")
    batches = [collate(examples[i:i + 2], pad_id) for i in range(0, len(examples), 2)]
    alone = list(featurize_batches(featurizer, batches, streams=1))
    together = list(featurize_batches(featurizer, batches, streams=3))  # more streams than this machine's cores
    assert len(together) == len(batches)
    for (features, losses, finite), (f, lo, fi) in zip(alone, together):
        assert finite.all() and fi.all()
        torch.testing.assert_close(f, features, rtol=1e-5, atol=1e-6 * features.abs().max().item())
        torch.testing.assert_close(lo, losses)
    assert not extractor._handles and all("forward" not in s.module.__dict__ for s in extractor._sites)  # detached


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_output_layer_loss_gives_autograds_cross_entropy_and_gradient(dtype):
    from g2is_graph.grads.gradients import _HeadLoss

    torch.manual_seed(0)
    weight = torch.randn(300, 16).to(dtype)
    hidden = torch.randn(7, 16, requires_grad=True)
    labels = torch.randint(0, 300, (7,))
    upstream = torch.rand(7)  # each token's weight in its example's mean loss
    logits = torch.nn.functional.linear(hidden.to(dtype), weight).float()
    expected = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected, hidden, upstream)
    loss = _HeadLoss.apply(hidden, weight, labels)
    (grad,) = torch.autograd.grad(loss, hidden, upstream)
    # bfloat16: the loss is good to the rounding of the top probability (2**-8 relative, its log absolutely)
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-5 if dtype == torch.float32 else 2**-8)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2  # bfloat16: rounding of the softmax, once, not twice
    assert grad.dtype == torch.float32
    torch.testing.assert_close(grad, expected_grad, rtol=tolerance, atol=tolerance * expected_grad.abs().max().item())


def test_the_output_layer_loss_stays_finite_where_a_label_probability_underflows():
    from g2is_graph.grads.gradients import _HeadLoss

    torch.manual_seed(1)
    weight = torch.randn(300, 16)
    hidden = torch.randn(5, 16) * 400  # logit gaps in the thousands: the labels' probabilities are 0 in float32
    labels = torch.randint(0, 300, (5,))
    expected = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="none")
    loss = _HeadLoss.apply(hidden, weight, labels)
    assert bool(torch.isfinite(loss).all()) and float(expected.max()) > 1000
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-3)
