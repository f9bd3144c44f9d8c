"""Per-example LoRA gradients in one batched backward pass, and the Adam-adjusted feature.

A LoRA factor is a bias-free Linear, so the gradient of example b's loss with respect to its weight is
sum_t grad_out[b, t] (x) input[b, t]. Forward hooks keep each LoRA Linear's input and register a tensor
hook on its output that keeps the output gradient; one backward of sum_b loss_b then yields every
example's gradient without a batch-size-1 loop. Examples do not interact (causal attention with a
padding mask, loss masked on padding), so padding leaves each example's gradient unchanged.

loss_b is the mean token cross-entropy over example b's loss tokens (labels != -100).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from g2is_graph.data.records import IGNORE_INDEX
from g2is_graph.errors import GradientError
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


def loss_token_losses(model, input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """[B] per-example losses with the output layer applied only at loss positions.

    Equal to per_example_loss(model(...).logits, labels), but the vocabulary projection and softmax (about a
    fifth of a small model's FLOPs and most of its memory traffic) skip prompt and padding positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cap = getattr(base.config, "final_logit_softcapping", None)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention).last_hidden_state
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        raise GradientError("an example has no loss token; such records must be rejected before this point")
    logits = base.get_output_embeddings()(hidden[:, :-1][mask]).float()
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


class PerExampleGradients:
    """Batched per-example gradients of the LoRA A/B weights of a peft model."""

    def __init__(self, model):
        self.model = model
        params = lora_parameters(model)
        self.spec = ParameterSpec(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params))
        self._modules = []
        for name, _ in params:
            if not name.endswith(".weight"):
                raise GradientError(f"unexpected LoRA parameter {name}: only weights are supported (bias='none')")
            self._modules.append(model.get_submodule(name[: -len(".weight")]))
        self._inputs: dict[int, torch.Tensor] = {}
        self._output_grads: dict[int, torch.Tensor] = {}
        self._handles = []

    def _attach(self) -> None:
        for index, module in enumerate(self._modules):
            def forward_hook(mod, args, output, index=index):
                self._inputs[index] = args[0].detach()
                output.register_hook(lambda grad, index=index: self._output_grads.__setitem__(index, grad.detach()))
            self._handles.append(module.register_forward_hook(forward_hook))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
        self._output_grads.clear()

    def compute(self, input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, D] float32 gradients in spec order, [B] losses). The model must be in eval mode."""
        if self.model.training:
            raise GradientError("call model.eval() first: dropout would make gradients random")
        device = next(self.model.parameters()).device
        self._attach()
        try:
            losses = loss_token_losses(self.model, input_ids.to(device), labels.to(device), attention.to(device))
            losses.sum().backward()
            blocks = []
            for index in range(len(self._modules)):
                x = self._inputs[index].float()
                grad_out = self._output_grads[index].float()
                per_example = torch.einsum("bto,bti->boi", grad_out, x)
                blocks.append(per_example.reshape(per_example.shape[0], -1))
            return torch.cat(blocks, dim=1), losses.detach().float()
        finally:
            self._detach()
            for _, p in lora_parameters(self.model):
                p.grad = None


def reference_gradient(model, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The batch-size-1 oracle: plain autograd on one unpadded example, flattened in spec order."""
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


def adam_feature(grads: torch.Tensor, state: AdamState, form: str = "less") -> torch.Tensor:
    """The update direction Adam would take for each example's gradient (rows of `grads`).

    less:      m' = b1 m + (1-b1) g;  v' = b2 v + (1-b2) g^2;  m' / sqrt(v' + eps)   (LESS, no bias correction)
    corrected: m'/(1-b1^t) / (sqrt(v'/(1-b2^t)) + eps) with t = step + 1
    """
    m = state.beta1 * state.exp_avg + (1 - state.beta1) * grads
    v = state.beta2 * state.exp_avg_sq + (1 - state.beta2) * grads * grads
    if form == "less":
        return m / torch.sqrt(v + state.eps)
    if form == "corrected":
        t = state.step + 1
        return (m / (1 - state.beta1 ** t)) / (torch.sqrt(v / (1 - state.beta2 ** t)) + state.eps)
    raise GradientError(f"adam form must be 'less' or 'corrected', not {form!r}")
