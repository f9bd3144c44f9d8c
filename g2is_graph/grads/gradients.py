"""Per-example LoRA gradients in one batched backward pass, and the Adam-adjusted feature.

A LoRA layer computes y = base(x) + s B A x, so example b's gradients are sums over its tokens of outer
products of the layer's input x, its output gradient g and the adapter's factors A x and s B^T g
(PerExampleGradients catches them in the layer's backward); one backward of sum_b loss_b then yields every
example's gradient without a batch-size-1 loop. Examples do not interact (causal attention
with a padding mask, loss masked on padding), so padding leaves each example's gradient unchanged.

loss_b is the mean token cross-entropy over example b's loss tokens (labels != -100).
"""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from g2is_graph.data.records import IGNORE_INDEX
from g2is_graph.errors import GradientError
from g2is_graph.grads.fused_llama import FusedLayer, LayerPlan, fused_applies, plan_layers
from g2is_graph.model.loading import lora_parameters


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B] mean cross-entropy over each example's loss tokens, computed in float32."""
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    token_loss = torch.nn.functional.cross_entropy(
        shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="none").view(shifted_labels.shape)
    counts = (shifted_labels != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        raise GradientError("an example has no loss token; such records must be rejected before this point")
    return token_loss.sum(dim=1) / counts


class _HeadLoss(torch.autograd.Function):
    """Token cross-entropy through a bias-free output layer, [N] float32, from one softmax of the logits.

    The softmax (float32 inside, rounded to the layer's dtype once) is what backward needs, so forward keeps it
    instead of the logits and backward is one product; the loss comes from it too: log-sum-exp = top - log p[top]
    at each row's largest logit, whose probability is at least 1 / vocabulary and so never underflows. Against
    a float32 log-softmax of the same logits this saves a float32 copy and two passes over [N, vocabulary];
    in a bfloat16 head the loss is then good to bfloat16's rounding of p[top] (about 0.004 per token), which
    only the gradient job's finite check and error messages read; the gradient is the one autograd forms."""

    @staticmethod
    def forward(ctx, hidden, weight, labels):
        logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight)
        top, where = logits.max(-1)
        picked = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        probabilities = torch.softmax(logits, -1)
        del logits
        top_probability = probabilities.gather(1, where.unsqueeze(1)).squeeze(1)
        loss = top.float() - top_probability.float().log() - picked.float()
        ctx.save_for_backward(probabilities, labels)
        ctx.weight, ctx.hidden_dtype = weight, hidden.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        probabilities, labels = ctx.saved_tensors
        probabilities[torch.arange(labels.shape[0], device=labels.device), labels] -= 1
        # the per-token loss gradient scales rows: applied after the product, to [N, hidden] instead of [N, vocab]
        return (probabilities @ ctx.weight).to(ctx.hidden_dtype).mul_(grad.unsqueeze(1)), None, None


def loss_token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """[B] per-example losses with the output layer applied only at loss positions.

    Equal to per_example_loss(model(...).logits, labels), but the vocabulary projection and softmax (about a
    fifth of a small model's FLOPs and most of its memory traffic) skip prompt and padding positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise GradientError("an example has no loss token; such records must be rejected before this point")
    head = base.get_output_embeddings()
    if not cap and type(head) is torch.nn.Linear and head.bias is None and not torch.is_autocast_enabled(hidden.device.type):
        token_loss = _HeadLoss.apply(hidden[:, :-1][mask], head.weight, shifted_labels[mask])
    else:
        logits = head(hidden[:, :-1][mask]).float()
        if cap:
            logits = cap * torch.tanh(logits / cap)
        token_loss = torch.nn.functional.cross_entropy(logits, shifted_labels[mask], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(shifted_labels)[mask]
    return torch.zeros(labels.shape[0], device=token_loss.device).index_add_(0, rows, token_loss) / counts


@dataclass(frozen=True)
class ParameterSpec:
    """The coordinate order of a flattened LoRA gradient."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def dim(self) -> int:
        total = 0
        for shape in self.shapes:
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def as_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes], "dim": self.dim}


BASE_BFLOAT16 = "_g2is_base_bfloat16"  # set on a model whose base layers bfloat16_base_layers converted


def _bfloat16_linear_forward(layer, x):
    """A converted layer's forward: its input rounded to bfloat16, its output back to float32 (one replaced
    forward instead of a pre-hook and a hook; no speed difference was measured, it is only simpler)."""
    return torch.nn.functional.linear(x.to(torch.bfloat16), layer.weight, layer.bias).float()


class _GatedSiluUp(torch.autograd.Function):
    """bfloat16(silu(x W_gate^T) * (x W_up^T)) of a float32 x, the products in bfloat16 and the rest in float32,
    as the converted layers compute it, but saving the two bfloat16 products (exact: they are the products'
    outputs) instead of three float32 [T, intermediate] activations: a third of a gated MLP's memory per token."""

    @staticmethod
    def forward(ctx, x, gate_weight, up_weight):
        low = x.to(torch.bfloat16)
        gate, up = torch.nn.functional.linear(low, gate_weight), torch.nn.functional.linear(low, up_weight)
        ctx.save_for_backward(gate, up, gate_weight, up_weight)
        return (torch.nn.functional.silu(gate.float()) * up.float()).to(torch.bfloat16)

    @staticmethod
    def backward(ctx, grad):
        gate, up, gate_weight, up_weight = ctx.saved_tensors
        gate, grad = gate.float(), grad.float()
        sigmoid = torch.sigmoid(gate)
        grad_up = grad * (gate * sigmoid)
        grad_gate = (grad * up.float()) * (sigmoid * (1 + gate * (1 - sigmoid)))
        grad_x = (grad_gate.to(torch.bfloat16) @ gate_weight).float() + (grad_up.to(torch.bfloat16) @ up_weight).float()
        return grad_x, None, None


def _gated_silu_forward(mlp, x):
    return mlp.down_proj(_GatedSiluUp.apply(x, mlp.gate_proj.weight, mlp.up_proj.weight))


def _is_plain_gated_silu(module) -> bool:
    """A Llama-style MLP, down(silu(gate(x)) * up(x)), whose three layers are plain bias-free Linears."""
    layers = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    return (all(type(layer) is torch.nn.Linear and layer.bias is None for layer in layers)
            and type(getattr(module, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation"))


def bfloat16_base_layers(model) -> int:
    """Run the frozen base model's linear layers (attention and MLP projections, the output head) in bfloat16:
    their weights become bfloat16 and each call casts its input to bfloat16 and its output back to float32.
    LoRA weights, embeddings, norms, attention and the residual stream stay float32, and so do the factors of
    every per-example gradient (each LoRA weight's input and output gradient); torch.autocast rounds those too,
    which is where its fidelity went (docs/benchmarks.md, issue 17). In place and once (the model keeps no
    float32 copy); returns the number of layers converted. A head tied to the input embeddings gets its own
    bfloat16 copy, so the embeddings stay float32. A Llama-style gated MLP whose layers are not LoRA-wrapped
    computes the same numbers through _GatedSiluUp, which keeps a third of the activations for backward."""
    if getattr(model, BASE_BFLOAT16, False):
        return 0
    converted = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or ".lora_" in name or module.weight.requires_grad:
            continue
        # a new Parameter: a head tied to the embeddings leaves them float32
        module.weight = torch.nn.Parameter(module.weight.detach().to(torch.bfloat16), requires_grad=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().to(torch.bfloat16), requires_grad=False)
        module.forward = types.MethodType(_bfloat16_linear_forward, module)
        converted += 1
    for module in model.modules():
        if _is_plain_gated_silu(module):
            module.forward = types.MethodType(_gated_silu_forward, module)
    for name, param in model.named_parameters():  # the rest off the loaded file's memory map, which then goes
        if param.dtype != torch.bfloat16 and ".lora_" not in name:  # (its pages would stay resident: +0.8 GB)
            param.data = param.data.clone()
    setattr(model, BASE_BFLOAT16, True)
    return converted


@dataclass(frozen=True)
class LoraSite:
    """One LoRA-wrapped layer: y = base(x) + scale * B A x, and where its A and B gradients go in the flat order."""

    module: torch.nn.Module
    adapter: str
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    a_index: int
    b_index: int


def lora_sites(model, names: tuple[str, ...]) -> list[LoraSite]:
    """The LoRA-wrapped layers of a peft model, from its LoRA weight names (spec order)."""
    index = {name: i for i, name in enumerate(names)}
    sites, seen = [], set()
    for name in names:
        if not name.endswith(".weight") or (".lora_A." not in name and ".lora_B." not in name):
            raise GradientError(f"unexpected LoRA parameter {name}: only the A and B weights of linear layers are "
                                "supported (bias='none', no embedding LoRA)")
        owner, adapter = name.rsplit(".lora_", 1)[0], name[:-len(".weight")].rsplit(".", 1)[1]
        if owner in seen:
            continue
        seen.add(owner)
        module = model.get_submodule(owner)
        a_name, b_name = f"{owner}.lora_A.{adapter}.weight", f"{owner}.lora_B.{adapter}.weight"
        if a_name not in index or b_name not in index:
            raise GradientError(f"{owner}: LoRA A and B must both be trained")
        if getattr(module, "lora_variant", None) or getattr(module, "use_dora", {}).get(adapter):
            raise GradientError(f"{owner}: only plain LoRA is supported (not DoRA or another variant)")
        if list(module.active_adapters) != [adapter]:
            raise GradientError(f"{owner}: exactly one active adapter is supported, not {list(module.active_adapters)}")
        sites.append(LoraSite(module, adapter, model.get_parameter(a_name), model.get_parameter(b_name),
                              float(module.scaling[adapter]), index[a_name], index[b_name]))
    return sites


def merge_lora(model) -> int:
    """Fold each LoRA product into its base weight (W + scale B A, peft's merge, in the base weight's dtype):
    the forward and backward passes then run one product per layer instead of three, and PerExampleGradients
    forms B A x's factors itself from the layer's input and output gradient. Exact up to float32 rounding in a
    float32 model; not for bfloat16 products, whose rounding of W + scale B A drops an update smaller than
    W's last bit (most of a short warmup's: Adam features' pairwise fidelity 0.9985 instead of 0.9998 at
    r=128, docs/benchmarks.md). In place and once; returns the number of layers merged. A merged model has no
    autograd path to its LoRA weights, so reference_gradient refuses it."""
    merged = 0
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "merge") and not module.merged:
            module.merge()
            merged += 1
    return merged


def is_merged(model) -> bool:
    return any(getattr(module, "merged", False) for module in model.modules() if hasattr(module, "lora_A"))


@dataclass(frozen=True)
class _Stream:
    """One thread's pass through the model: the inputs of the hooked layers it entered, its consumer, its autocast."""

    inputs: dict[tuple[str, int], torch.Tensor]
    consume: object
    autocast: str


class _LoraDelta(torch.autograd.Function):
    """scale * B A x of one LoRA layer, as peft computes it, whose backward also hands the layer's factors
    (the gradient at B's output, A x, B^T of that gradient, x) to a sink: no hooks on the A and B Linears and
    none of their autograd nodes (the per-call Python of a small model is what a CPU's streams contend for)."""

    @staticmethod
    def forward(ctx, x, a, b, scale, sink):
        h = x @ a.T
        ctx.save_for_backward(x, h)
        ctx.a, ctx.b, ctx.scale, ctx.sink = a, b, scale, sink
        return (h @ b.T) * scale

    @staticmethod
    def backward(ctx, grad):
        x, h = ctx.saved_tensors
        scaled = grad * ctx.scale
        u = scaled @ ctx.b
        ctx.sink(scaled, h, u, x)
        return u @ ctx.a, None, None, None, None


class PerExampleGradients:
    """Batched per-example gradients of the LoRA A/B weights of a peft model, one layer at a time.

    For a layer y = base(x) + s B A x with output gradient g, example b's gradients are
    dB = sum_t s g_t (A x_t)^T and dA = sum_t (s B^T g_t) x_t^T. While streaming, a layer computes s B A x
    through _LoraDelta, whose backward hands those factors over; under torch.autocast peft's own forward runs
    and hooks on the A and B Linears catch the factors (their inputs and output gradients); a layer whose LoRA
    is merged into its base weight (merge_lora: fewer products) is hooked itself and forms A x and s B^T g.

    `stream` hands each LoRA weight's [B, n] per-example gradient to a callback during the backward pass,
    as soon as it is formed, and keeps nothing: memory is the model, one batch's activations and the
    largest single weight's [B, n], never the [B, D] matrix of all of them (D = 14.7M numbers per example
    for SmolLM2 at LoRA r=128, 134M for a 7B model). Several threads may stream through one model at once
    (each pass's state is its thread's), which is how a CPU runs several small examples side by side."""

    def __init__(self, model):
        self.model = model
        params = lora_parameters(model)
        self.spec = ParameterSpec(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params))
        self._params = [p for _, p in params]
        self._sites = lora_sites(model, self.spec.names)
        self.offsets: list[int] = []  # start of each weight in the flattened gradient (spec order)
        offset = 0
        for p in self._params:
            self.offsets.append(offset)
            offset += p.numel()
        self._handles = []
        self._streams = 0  # streams in progress: the hooks are attached while any is
        self._attached = threading.Lock()
        self._local = threading.local()  # each thread's stream: its layer inputs and consumer
        self.fused: tuple[list[LayerPlan], str | None] | None = None  # (plans, why not): base-bfloat16 only

    def _attach(self) -> None:
        # The graph starts at the embeddings' output, not at the LoRA weights: autograd then forms only the
        # gradients flowing through the layers (which the hooks need), never the batch-summed weight
        # gradients (a D-sized buffer and the cost of one more matrix product per LoRA weight).
        with self._attached:
            self._streams += 1
            if self._streams > 1:
                return
            embeddings = self.model.get_input_embeddings()
            self._handles.append(embeddings.register_forward_hook(
                lambda mod, args, output: output.detach().requires_grad_()))
            for p in self._params:
                p.requires_grad_(False)
            for index, site in enumerate(self._sites):
                if site.module.merged:  # one product per layer: hook the layer, form B A x's factors here
                    self._hook(site.module, ("layer", index))
                    continue
                # peft's forward under torch.autocast (its products in bfloat16): each LoRA Linear's input and
                # output gradient are the factors; otherwise the layer computes scale B A x through _LoraDelta
                self._hook(site.module.lora_A[site.adapter], ("weight", site.a_index))
                self._hook(site.module.lora_B[site.adapter], ("weight", site.b_index))
                site.module.forward = functools.partial(self._lora_forward, site)
            for plan in self.plan_fused()[0]:
                plan.layer.forward = functools.partial(self._layer_forward, plan)

    def plan_fused(self) -> tuple[list[LayerPlan], str | None]:
        """(plans, why not) of the fused decoder layers (fused_llama), made once for a base-bfloat16 model."""
        if not getattr(self.model, BASE_BFLOAT16, False):
            return [], "only base-bfloat16 runs fused layers"
        if self.fused is None:
            self.fused = plan_layers(self.model, self._sites)
        return self.fused

    def layer_path(self) -> str:
        """What computes the decoder layers, for a job's log: fused layers or the model's own code, and why."""
        plans, why = self.plan_fused()
        if plans:
            return (f"{len(plans)} decoder layers fused ({type(plans[0].layer).__name__}: written-out forward and "
                    "backward) where a batch has no padding")
        return f"decoder layers run the model's own code ({why})"

    def _layer_forward(self, plan: LayerPlan, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stream = getattr(self._local, "stream", None)
        if (stream is None or stream.autocast != "base-bfloat16" or not torch.is_grad_enabled()
                or not fused_applies(plan, hidden, args, kwargs)):
            return type(plan.layer).forward(plan.layer, hidden, *args, **kwargs)
        cos, sin = kwargs["position_embeddings"]
        return FusedLayer.apply(hidden, cos, sin, plan, functools.partial(self._lora_formed_bfloat16, stream))

    def _lora_forward(self, site: LoraSite, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        stream = getattr(self._local, "stream", None)
        if stream is None or stream.autocast == "bfloat16" or args or kwargs:
            return type(site.module).forward(site.module, x, *args, **kwargs)
        delta = _LoraDelta.apply(x.to(site.a.dtype), site.a, site.b, site.scale,
                                 lambda scaled, h, u, x: self._lora_formed(stream, site, scaled, h, u, x))
        result = site.module.base_layer(x)
        return (result + delta).to(result.dtype)  # as peft: a half model's float32 adapter adds in float32

    def _lora_formed(self, stream: "_Stream", site: LoraSite, scaled: torch.Tensor, h: torch.Tensor,
                     u: torch.Tensor, x: torch.Tensor) -> None:
        """Hand over one layer's per-example dB = sum_t scaled_t h_t^T and dA = sum_t u_t x_t^T (scaled: the
        gradient at B's output, h = A x, u = B^T scaled)."""
        self._hand_over(stream, site, torch.bmm(scaled.float().transpose(1, 2), h.float()),
                        torch.bmm(u.float().transpose(1, 2), x.float()))

    def _lora_formed_bfloat16(self, stream: "_Stream", site: LoraSite, grad_out: torch.Tensor, h: torch.Tensor,
                              u: torch.Tensor, x: torch.Tensor) -> None:
        """The fused layers' hand-over, every factor in bfloat16 as their products made or took it (g and x as cast
        for the input-gradient and forward products, h = A x and u = scale B^T g as they came out): dB = scale
        sum_t g_t h_t^T and dA = sum_t u_t x_t^T accumulate in float32 and round once per entry, no casts."""
        self._hand_over(stream, site, torch.bmm(grad_out.transpose(1, 2), h).float().mul_(site.scale),
                        torch.bmm(u.transpose(1, 2), x).float())

    def _hand_over(self, stream: "_Stream", site: LoraSite, b_grads: torch.Tensor, a_grads: torch.Tensor) -> None:
        """Pass a layer's per-example [B, out, r] dB and [B, r, in] dA to the stream's consumer, flattened."""
        stream.consume(site.b_index, self.offsets[site.b_index], b_grads.view(b_grads.shape[0], -1))
        stream.consume(site.a_index, self.offsets[site.a_index], a_grads.view(a_grads.shape[0], -1))

    def _hook(self, module, key: tuple[str, int]) -> None:
        self._handles.append(module.register_forward_hook(lambda mod, args, output: self._entered(key, args[0], output)))

    def _entered(self, key: tuple[str, int], x: torch.Tensor, output: torch.Tensor) -> None:
        stream = getattr(self._local, "stream", None)  # the thread running this forward pass owns it
        if stream is None:  # a plain forward pass in another thread while this one streams
            return
        stream.inputs[key] = x.detach()
        output.register_hook(lambda grad: self._formed(stream, key, grad))

    def _formed(self, stream: "_Stream", key: tuple[str, int], grad_out: torch.Tensor) -> None:
        x, grad_out = stream.inputs.pop(key).float(), grad_out.detach().float()
        kind, index = key
        if kind == "weight":  # a LoRA Linear: sum_t grad_out_t x_t^T
            grads = torch.einsum("bto,bti->boi", grad_out, x)
            stream.consume(index, self.offsets[index], grads.reshape(grads.shape[0], -1))
            return
        site = self._sites[index]
        scaled = grad_out * site.scale  # the gradient at B's output
        a, b = site.a.detach().float(), site.b.detach().float()
        self._lora_formed(stream, site, scaled, x @ a.T, scaled @ b, x)

    def _detach(self) -> None:
        with self._attached:
            self._streams -= 1
            if self._streams:
                return
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            for site in self._sites:
                site.module.__dict__.pop("forward", None)
            for plan in self.plan_fused()[0]:  # planned in _attach already
                plan.layer.__dict__.pop("forward", None)
            for p in self._params:
                p.requires_grad_(True)

    def stream(self, input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor, consume,
               autocast: str = "float32") -> torch.Tensor:
        """Call consume(index, start, grads [B, n] float32) once per LoRA weight (spec index, first coordinate
        in the flattened gradient) during one backward pass; returns the [B] float32 losses.

        autocast "bfloat16" runs the model's matrix products in bfloat16 (torch.autocast); "base-bfloat16"
        needs the model's base layers in bfloat16 (bfloat16_base_layers); gradients are still formed and
        handed over in float32. The model must be in eval mode."""
        if self.model.training:
            raise GradientError("call model.eval() first: dropout would make gradients random")
        converted = getattr(self.model, BASE_BFLOAT16, False)
        if converted != (autocast == "base-bfloat16"):
            raise GradientError(f"autocast {autocast!r} on a model whose base layers are "
                                f"{'bfloat16' if converted else 'float32'}: "
                                "base-bfloat16 and the model's state go together (load the model again)")
        device = next(self.model.parameters()).device
        stream = self._local.stream = _Stream({}, consume, autocast)
        self._attach()
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
                losses = loss_token_losses(self.model, input_ids.to(device), labels.to(device), attention.to(device))
            losses.sum().backward()
            if stream.inputs:
                raise GradientError(f"{len(stream.inputs)} LoRA layers received no gradient (unused modules?)")
            return losses.detach().float()
        finally:
            self._detach()
            del self._local.stream

    def compute(self, input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor,
                autocast: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
        """([B, D] float32 gradients in spec order, [B] losses): the whole matrix, for tests and small D only."""
        blocks: dict[int, torch.Tensor] = {}
        losses = self.stream(input_ids, labels, attention, lambda index, start, grads: blocks.__setitem__(index, grads),
                             autocast)
        return torch.cat([blocks[i] for i in range(len(self._params))], dim=1), losses


def reference_gradient(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch-size-1 oracle: plain autograd on one unpadded example, flattened in spec order."""
    if is_merged(model):
        raise GradientError("reference_gradient needs a model whose LoRA is not merged (merge_lora removes the "
                            "autograd path to the LoRA weights)")
    params = lora_parameters(model)
    for _, p in params:
        p.grad = None
    device = next(model.parameters()).device
    logits = model(input_ids=input_ids.to(device)).logits
    per_example_loss(logits, labels.to(device)).sum().backward()
    flat = torch.cat([p.grad.detach().float().reshape(-1) for _, p in params])
    for _, p in params:
        p.grad = None
    return flat


@dataclass(frozen=True)
class AdamState:
    """A checkpoint's Adam moments, flattened in the gradient's coordinate order."""

    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    step: int
    beta1: float
    beta2: float
    eps: float

    def slice(self, start: int, stop: int) -> "AdamState":
        """The moments of coordinates [start, stop): the Adam feature is elementwise, so it can be formed
        one LoRA weight at a time."""
        return AdamState(self.exp_avg[start:stop], self.exp_avg_sq[start:stop], self.step, self.beta1,
                         self.beta2, self.eps)

    def to(self, device) -> "AdamState":
        return AdamState(self.exp_avg.to(device), self.exp_avg_sq.to(device), self.step, self.beta1, self.beta2,
                         self.eps)


def adam_feature(grads: torch.Tensor, state: AdamState, form: str = "less", in_place: bool = False) -> torch.Tensor:
    """The update direction Adam would take for each example's gradient (rows of `grads`).

    less:      m' = b1 m + (1-b1) g;  v' = b2 v + (1-b2) g^2;  m' / sqrt(v' + eps)   (LESS, no bias correction)
    corrected: m'/(1-b1^t) / (sqrt(v'/(1-b2^t)) + eps) with t = step + 1
    in_place overwrites `grads` with the result and needs one temporary of its size instead of four."""
    if form not in ("less", "corrected"):
        raise GradientError(f"adam form must be 'less' or 'corrected', not {form!r}")
    v = torch.mul(grads, grads).mul_(1 - state.beta2).add_(state.exp_avg_sq, alpha=state.beta2)
    m = (grads if in_place else grads.clone()).mul_(1 - state.beta1).add_(state.exp_avg, alpha=state.beta1)
    if form == "less":
        return m.div_(v.add_(state.eps).sqrt_())
    t = state.step + 1
    return m.div_(1 - state.beta1 ** t).div_(v.div_(1 - state.beta2 ** t).sqrt_().add_(state.eps))


def cpu_bf16_units() -> list[str]:
    """This CPU's bfloat16 matrix instructions among AMX-BF16 and AVX512-BF16 (Linux /proc/cpuinfo flags)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in ("amx_bf16", "avx512_bf16") if f in flags]


def resolve_autocast(setting: str, device: str) -> tuple[str, str]:
    """(float32 | bfloat16 | base-bfloat16, why) for GradientConfig.autocast on `device`. `auto` takes
    bfloat16 autocast on GPUs with bfloat16 (measured on an H100 in issue 3), base-bfloat16 on CPUs whose
    flags list AMX-BF16 or AVX512-BF16 (the base layers' products in bfloat16, everything the gradient is
    formed from in float32: faster than float32 and as faithful, docs/benchmarks.md, issue 17), else float32
    (a CPU without bfloat16 instructions emulates them, slower than float32)."""
    if setting != "auto":
        return setting, "as configured"
    if device.startswith("cuda"):
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU has bfloat16"
        return "float32", "auto: this GPU has no bfloat16"
    units = cpu_bf16_units()
    if units:
        return "base-bfloat16", f"auto: this CPU has {'/'.join(units)}; LoRA, attention and norms stay float32"
    return "float32", "auto: this CPU has no bfloat16 instructions"


AUTOCASTS = ("float32", "bfloat16", "base-bfloat16")


class GradientFeaturizer:
    """Projected per-example features, one LoRA weight at a time: rows of P^T g (sgd) or P^T adam(g) (adam).

    Each weight's per-example gradient is turned into its Adam feature with that weight's slice of the
    moments (the feature is elementwise) and projected with the matrix rows at its absolute coordinates,
    then dropped; the sum over weights is the projection of the whole feature vector. The extractor's model
    is prepared in place when the featurizer is made: a float32 model's LoRA is merged into its base weights
    (merge_lora), and for autocast "base-bfloat16" the base layers are converted (bfloat16_base_layers)."""

    def __init__(self, extractor: PerExampleGradients, projector, adam: AdamState | None = None,
                 adam_form: str = "less", autocast: str = "float32"):
        if projector.in_dim != extractor.spec.dim:
            raise GradientError(f"projector expects {projector.in_dim} coordinates, the adapter has {extractor.spec.dim}")
        if adam is not None and adam.exp_avg.numel() != extractor.spec.dim:
            raise GradientError(f"Adam state has {adam.exp_avg.numel()} coordinates, the adapter {extractor.spec.dim}")
        if autocast not in AUTOCASTS:
            raise GradientError(f"autocast must be one of {', '.join(AUTOCASTS)}, not {autocast!r}")
        if autocast != "float32" and is_merged(extractor.model):
            raise GradientError(f"autocast {autocast!r} on a model whose LoRA is merged into its base weights: their "
                                "bfloat16 rounding would drop the adapter's small updates (load the model again)")
        if autocast == "float32" and next(extractor.model.parameters()).dtype == torch.float32:
            merge_lora(extractor.model)  # exact up to float32 rounding, and a third fewer LoRA products
        if autocast == "base-bfloat16":
            bfloat16_base_layers(extractor.model)
            extractor.plan_fused()
        self.extractor, self.projector, self.adam, self.adam_form, self.autocast = (
            extractor, projector, adam, adam_form, autocast)

    @property
    def dim(self) -> int:
        return self.projector.dim

    def features(self, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([B, dim] float32 features, [B] losses, [B] bool: every coordinate of the example was finite)."""
        out = torch.zeros(input_ids.shape[0], self.dim, dtype=torch.float32, device=self.projector.device)

        def consume(index: int, start: int, grads: torch.Tensor) -> None:
            if self.adam is not None:
                grads = adam_feature(grads, self.adam.slice(start, start + grads.shape[1]), self.adam_form, in_place=True)
            self.projector.project_into(out, grads, start)

        losses = self.extractor.stream(input_ids, labels, attention, consume, self.autocast)
        # every input coordinate has a non-zero in the projection, so a non-finite one reaches the features
        return out, losses, torch.isfinite(out).all(dim=1) & torch.isfinite(losses).to(out.device)


def featurize_batches(featurizer: GradientFeaturizer, batches: Iterable[tuple[torch.Tensor, ...]],
                      streams: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """featurizer.features(ids, labels, attention) of each batch, in order, with `streams` batches in flight
    at once: each in its own thread, which gets an equal share of this thread's math threads (a CPU's small
    products and the hooks' Python overlap across streams better than they split across cores)."""
    if streams <= 1:
        yield from (featurizer.features(*batch[:3]) for batch in batches)
        return
    threads = max(1, torch.get_num_threads() // streams)
    with ThreadPoolExecutor(streams, thread_name_prefix="g2is-stream", initializer=torch.set_num_threads,
                            initargs=(threads,)) as pool:
        yield from pool.map(lambda batch: featurizer.features(*batch[:3]), batches)
