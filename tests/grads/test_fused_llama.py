"""Fused Llama decoder layers (base-bfloat16 on a CPU) against the model's own layers and plain float32 autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import lora_model

from g2is_graph.config import DataConfig, ProjectorConfig
from g2is_graph.data.records import collate, encode_all, read_jsonl
from g2is_graph.grads import fused_llama
from g2is_graph.grads.gradients import (
    GradientFeaturizer,
    PerExampleGradients,
    bfloat16_base_layers,
    featurize_batches,
    reference_gradient,
)
from g2is_graph.grads.projection import Projector
from g2is_graph.model.loading import load_tokenizer


@pytest.fixture(scope="module")
def examples(tiny_model, tmp_path_factory):
    from conftest import write_pool

    pool = write_pool(tmp_path_factory.mktemp("f") / "pool.jsonl", 6)
    tokenizer = load_tokenizer(tiny_model)
    _, encoded, _ = encode_all(read_jsonl(pool).records, tokenizer, DataConfig())
    return encoded, tokenizer.pad_token_id


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    forward = fused_llama.FusedLayer.forward

    def counted(ctx, *args):
        calls.append(args[0].shape)
        return forward(ctx, *args)

    monkeypatch.setattr(fused_llama.FusedLayer, "forward", staticmethod(counted))
    return calls


def per_example(extractor, examples, pad_id):
    """Each example alone (no padding: the fused layers' case), stacked."""
    rows = [extractor.compute(*collate([e], pad_id), autocast="base-bfloat16") for e in examples]
    return torch.cat([g for g, _ in rows]), torch.cat([loss for _, loss in rows])


def converted(tiny_model, fused: bool, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    model = lora_model(tiny_model, targets=targets)
    bfloat16_base_layers(model)
    extractor = PerExampleGradients(model)
    if not fused:
        extractor.fused = ([], "turned off by the test")
    return extractor


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj"), ("q_proj", "v_proj")])
def test_fused_layers_give_the_gradients_of_the_models_own_layers(tiny_model, examples, fused_calls, targets):
    encoded, pad_id = examples
    exact = torch.stack([reference_gradient(lora_model(tiny_model, targets=targets), torch.tensor([e.input_ids]),
                                            torch.tensor([e.labels])) for e in encoded])
    own, own_losses = per_example(converted(tiny_model, False, targets), encoded, pad_id)
    assert not fused_calls
    fused, fused_losses = per_example(converted(tiny_model, True, targets), encoded, pad_id)
    assert len(fused_calls) == 2 * len(encoded)  # both layers of every example ran fused
    assert not torch.equal(fused, own)  # really another computation
    assert cosines(fused, own).min() > 0.999
    assert cosines(fused, exact).min() > 0.999 and cosines(own, exact).min() > 0.999
    torch.testing.assert_close(fused_losses, own_losses, rtol=2e-3, atol=0)


def test_a_padded_batch_runs_the_models_own_layers_with_the_planned_weights(tiny_model, examples, fused_calls):
    encoded, pad_id = examples
    batch = collate(encoded, pad_id)
    planned = converted(tiny_model, True)
    assert planned.plan_fused()[1] is None
    own, own_losses = converted(tiny_model, False).compute(*batch, autocast="base-bfloat16")
    grads, losses = planned.compute(*batch, autocast="base-bfloat16")
    assert not fused_calls  # padding: the attention mask is not the plain causal one
    torch.testing.assert_close(grads, own, rtol=0, atol=0)  # the base weights are views of the same numbers
    torch.testing.assert_close(losses, own_losses, rtol=0, atol=0)


def test_plans_keep_one_copy_of_the_base_weights_and_the_models_outputs(tiny_model, examples):
    encoded, pad_id = examples
    extractor = converted(tiny_model, True)
    model = extractor.model
    ids = torch.tensor([encoded[0].input_ids])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        plans, why = extractor.plan_fused()
        after = model(input_ids=ids).logits
    assert why is None and len(plans) == 2
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for plan in plans:
        attn, mlp = plan.layer.self_attn, plan.layer.mlp
        for module in (attn.q_proj.base_layer, attn.k_proj.base_layer, attn.v_proj.base_layer):
            assert module.weight.untyped_storage().data_ptr() == plan.qkv_stack.untyped_storage().data_ptr()
        assert attn.o_proj.base_layer.weight.untyped_storage().data_ptr() == plan.o_stack.untyped_storage().data_ptr()
        assert mlp.up_proj.weight.untyped_storage().data_ptr() == plan.gate_up.untyped_storage().data_ptr()
    assert extractor.plan_fused()[0] is plans  # planned once


def test_a_model_that_cannot_be_fused_says_why_and_runs_its_own_layers(tiny_model, examples, fused_calls):
    encoded, pad_id = examples
    extractor = converted(tiny_model, True, targets=("q_proj", "gate_proj"))
    plans, why = extractor.plan_fused()
    assert not plans and "mlp.gate_proj" in why
    assert why in extractor.layer_path()
    grads, _ = extractor.compute(*collate(encoded[:1], pad_id), autocast="base-bfloat16")
    assert torch.isfinite(grads).all() and not fused_calls
    float32 = PerExampleGradients(lora_model(tiny_model))
    assert float32.plan_fused() == ([], "only base-bfloat16 runs fused layers")


def test_fused_streams_in_threads_give_each_batch_the_features_it_gets_alone(tiny_model, examples, fused_calls):
    encoded, pad_id = examples
    extractor = PerExampleGradients(lora_model(tiny_model))
    featurizer = GradientFeaturizer(extractor, Projector(ProjectorConfig(dim=64), extractor.spec.dim),
                                    autocast="base-bfloat16")
    batches = [collate([e], pad_id) for e in encoded]
    alone = list(featurize_batches(featurizer, batches, streams=1))
    together = list(featurize_batches(featurizer, batches, streams=3))
    assert len(fused_calls) == 2 * 2 * len(encoded)
    for (features, losses, finite), (f, lo, fi) in zip(alone, together):
        assert finite.all() and fi.all()
        torch.testing.assert_close(f, features, rtol=1e-5, atol=1e-6 * features.abs().max().item())
        torch.testing.assert_close(lo, losses)
    assert all("forward" not in plan.layer.__dict__ for plan in extractor.fused[0])  # detached
