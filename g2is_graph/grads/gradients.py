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


BASE_BFLOAT16 = "_g2is_base_bfloat16"  # set on a model whose base layers bfloat16_base_layers converted


def _to_bfloat16(module, args):
    return (args[0].to(torch.bfloat16), *args[1:])


def _to_float32(module, args, output):
    return output.float()


def bfloat16_base_layers(model) -> int:
    """Run the frozen base model's linear layers (attention and MLP projections, the output head) in bfloat16:
    their weights become bfloat16 and each call casts its input to bfloat16 and its output back to float32.
    LoRA weights, embeddings, norms, attention and the residual stream stay float32, and so do the factors of
    every per-example gradient (each LoRA weight's input and output gradient); torch.autocast rounds those too,
    which is where its fidelity went (docs/benchmarks.md, issue 17). In place and once (the model keeps no
    float32 copy); returns the number of layers converted. A head tied to the input embeddings gets its own
    bfloat16 copy, so the embeddings stay float32."""
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
        module.register_forward_pre_hook(_to_bfloat16)
        module.register_forward_hook(_to_float32)
        converted += 1
    for name, param in model.named_parameters():  # the rest off the loaded file's memory map, which then goes
        if param.dtype != torch.bfloat16 and ".lora_" not in name:  # (its pages would stay resident: +0.8 GB)
            param.data = param.data.clone()
    setattr(model, BASE_BFLOAT16, True)
    return converted


class PerExampleGradients:
    """Batched per-example gradients of the LoRA A/B weights of a peft model, one weight at a time.

    `stream` hands each LoRA weight's [B, n] per-example gradient to a callback during the backward pass,
    as soon as it is formed, and keeps nothing: memory is the model, one batch's activations and the
    largest single weight's [B, n], never the [B, D] matrix of all of them (D = 14.7M numbers per example
    for SmolLM2 at LoRA r=128, 134M for a 7B model)."""

    def __init__(self, model):
        self.model = model
        params = lora_parameters(model)
        self.spec = ParameterSpec(tuple(n for n, _ in params), tuple(tuple(p.shape) for _, p in params))
        self._params = [p for _, p in params]
        self._modules = []
        self.offsets: list[int] = []  # start of each weight in the flattened gradient (spec order)
        offset = 0
        for name, p in params:
            if not name.endswith(".weight"):
                raise GradientError(f"unexpected LoRA parameter {name}: only weights are supported (bias='none')")
            self._modules.append(model.get_submodule(name[: -len(".weight")]))
            self.offsets.append(offset)
            offset += p.numel()
        self._inputs: dict[int, torch.Tensor] = {}
        self._handles = []

    def _attach(self, consume) -> None:
        # The graph starts at the embeddings' output, not at the LoRA weights: autograd then forms only the
        # gradients flowing through the layers (which the hooks need), never the batch-summed weight
        # gradients (a D-sized buffer and the cost of one more matrix product per LoRA weight).
        embeddings = self.model.get_input_embeddings()
        self._handles.append(embeddings.register_forward_hook(lambda mod, args, output: output.detach().requires_grad_()))
        for p in self._params:
            p.requires_grad_(False)
        for index, module in enumerate(self._modules):
            def forward_hook(mod, args, output, index=index):
                self._inputs[index] = args[0].detach()
                output.register_hook(lambda grad, index=index: self._formed(index, grad, consume))
            self._handles.append(module.register_forward_hook(forward_hook))

    def _formed(self, index: int, grad_out: torch.Tensor, consume) -> None:
        x = self._inputs.pop(index).float()
        per_example = torch.einsum("bto,bti->boi", grad_out.detach().float(), x)
        consume(index, self.offsets[index], per_example.reshape(per_example.shape[0], -1))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._inputs.clear()
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
        self._attach(consume)
        try:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
                losses = loss_token_losses(self.model, input_ids.to(device), labels.to(device), attention.to(device))
            losses.sum().backward()
            if self._inputs:
                raise GradientError(f"{len(self._inputs)} LoRA weights received no gradient (unused modules?)")
            return losses.detach().float()
        finally:
            self._detach()

    def compute(self, input_ids: torch.Tensor, labels: torch.Tensor, attention: torch.Tensor,
                autocast: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
        """([B, D] float32 gradients in spec order, [B] losses): the whole matrix, for tests and small D only."""
        blocks: dict[int, torch.Tensor] = {}
        losses = self.stream(input_ids, labels, attention, lambda index, start, grads: blocks.__setitem__(index, grads),
                             autocast)
        return torch.cat([blocks[i] for i in range(len(self._modules))], dim=1), losses


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
    then dropped; the sum over weights is the projection of the whole feature vector. autocast
    "base-bfloat16" converts the extractor's model in place (bfloat16_base_layers) when it is made."""

    def __init__(self, extractor: PerExampleGradients, projector, adam: AdamState | None = None,
                 adam_form: str = "less", autocast: str = "float32"):
        if projector.in_dim != extractor.spec.dim:
            raise GradientError(f"projector expects {projector.in_dim} coordinates, the adapter has {extractor.spec.dim}")
        if adam is not None and adam.exp_avg.numel() != extractor.spec.dim:
            raise GradientError(f"Adam state has {adam.exp_avg.numel()} coordinates, the adapter {extractor.spec.dim}")
        if autocast not in AUTOCASTS:
            raise GradientError(f"autocast must be one of {', '.join(AUTOCASTS)}, not {autocast!r}")
        if autocast == "base-bfloat16":
            bfloat16_base_layers(extractor.model)
        self.extractor, self.projector, self.adam, self.adam_form, self.autocast = (
            extractor, projector, adam, adam_form, autocast)

    @property
    def dim(self) -> int:
        return self.projector.dim

    def features(self, input_ids: torch.Tensor, labels: torch.Tensor,
                 attention: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """([B, dim] float32 features, [B] losses, [B] bool: every coordinate of the example was finite)."""
        batch = input_ids.shape[0]
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=self.projector.device)
        finite = torch.ones(batch, dtype=torch.bool, device=self.projector.device)

        def consume(index: int, start: int, grads: torch.Tensor) -> None:
            if self.adam is not None:
                grads = adam_feature(grads, self.adam.slice(start, start + grads.shape[1]), self.adam_form, in_place=True)
            finite.logical_and_(torch.isfinite(grads).all(dim=1).to(finite.device))
            self.projector.project_into(out, grads, start)

        losses = self.extractor.stream(input_ids, labels, attention, consume, self.autocast)
        return out, losses, finite & torch.isfinite(losses).to(finite.device)
