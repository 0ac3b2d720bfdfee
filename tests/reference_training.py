"""The reference side of the LoRA training tests: peft + torch autograd + torch.optim.AdamW.

The engine's LoRA adapter (tinker._training.LoraAdapter) names its tensors
`layers.{l}.{proj}.lora_A` [R, in] / `layers.{l}.{proj}.lora_B` [out, R] for proj in q, k, v, o,
gate, up, down, and `unembed.lora_A` [R, D] / `unembed.lora_B` [V, R]. These are exactly peft's
`lora_A.weight` / `lora_B.weight` of `model.layers.{l}.self_attn.{q,k,v,o}_proj`,
`model.layers.{l}.mlp.{gate,up,down}_proj` and `lm_head`, with alpha 32 and scale alpha / rank
(DESIGN.md §5). With tied embeddings peft wraps `lm_head` only: the adapter changes the output
projection and leaves the input embedding alone, as the engine does.

- `peft_model(hf_model, rank, ...)` wraps (a copy of) a float32 transformers model with peft;
  `load_adapter_values` copies named tensors into it, `peft_gradients` reads the grads back;
  `expected_tensor_shapes` lists the names and shapes from a config; `random_adapter_values` makes
  non-zero A and B (a fresh adapter's B = 0 makes every lora_A gradient zero).
- `reference_losses(lp, inputs, loss_fn, config)`: the five Tinker losses exactly as the docs write
  them (reference/tinker-api.md §6.6), summed over tokens, on [N] or [N, K] targets
  (`reference_loss_terms` before the sum; `loss_lp_gradients` gives ∂loss/∂lp for tolerances).
- `reference_forward_backward(peft_model, data, loss_fn, config)`: the per-datum learner logprobs
  and the loss summed over datums; the gradients land in the peft model's LoRA weights.
- `TorchAdamW` / `torch_adamw_step`: torch.optim.AdamW plus clip_grad_norm_ (global norm) with
  hyperparameters that may change every step.
- `to_float64(model)`: a truly float64 copy, to tell the float32 reference's own rounding from an
  engine error. Measured with it: the float32 peft gradients are within ~1e-6 per tensor
  (‖Δg‖/‖g‖) of float64 on the tiny models, and within ~2.5e-5 on SmolLM2-135M with adapter
  values of gain 0.1 (~1.8e-4 at gain 0.3, where the adapter moves logprobs by ~1.3 nats).

`data` is what LoraAdapter.forward_backward takes: a list of (tokens, loss_fn_inputs) with numpy
arrays in loss_fn_inputs ("target_tokens" [N] or [N, K], and float arrays of the same shape).
"""

from __future__ import annotations

import copy
import re
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

LORA_ALPHA = 32.0
ATTN_PROJS = ("q", "k", "v", "o")
MLP_PROJS = ("gate", "up", "down")
_HF_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip
_PROJ_OF = {v.split(".")[1]: k for k, v in _HF_MODULE.items()}  # "q_proj" -> "q"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+_proj)$")

LOSS_FNS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro")
CLIP_DEFAULTS = {"ppo": (0.8, 1.2), "cispo": (0.0, 4.0)}


# ---- peft ---------------------------------------------------------------------------------------


def target_modules(train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = True) -> list[str]:
    targets = []
    if train_attn:
        targets += [_HF_MODULE[p].split(".")[1] for p in ATTN_PROJS]
    if train_mlp:
        targets += [_HF_MODULE[p].split(".")[1] for p in MLP_PROJS]
    if train_unembed:
        targets.append("lm_head")
    if not targets:
        raise ValueError("at least one of train_attn, train_mlp, train_unembed must be set")
    return targets


def expected_tensor_shapes(config, rank: int, train_attn=True, train_mlp=True, train_unembed=True) -> dict:
    """name -> shape of every LoRA tensor, from a transformers config."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    hd = getattr(config, "head_dim", None) or d // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    io = {"q": (d, q_out), "k": (d, kv_out), "v": (d, kv_out), "o": (q_out, d),
          "gate": (d, f), "up": (d, f), "down": (f, d)}  # fmt: skip
    projs = (ATTN_PROJS if train_attn else ()) + (MLP_PROJS if train_mlp else ())
    shapes = {}
    for layer in range(config.num_hidden_layers):
        for p in projs:
            n_in, n_out = io[p]
            shapes[f"layers.{layer}.{p}.lora_A"] = (rank, n_in)
            shapes[f"layers.{layer}.{p}.lora_B"] = (n_out, rank)
    if train_unembed:
        shapes["unembed.lora_A"] = (rank, d)
        shapes["unembed.lora_B"] = (v, rank)
    return shapes


def peft_model(hf_model, rank: int, train_attn: bool = True, train_mlp: bool = True, train_unembed: bool = True,
               *, copy_model: bool = True):  # fmt: skip
    """A peft LoRA model (r=rank, alpha 32, no dropout, no bias) over a float32 transformers model.

    peft injects its layers in place, so by default this wraps a deep copy and leaves `hf_model`
    reusable. The base weights are frozen; only the LoRA A/B weights require grad."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(hf_model) if copy_model else hf_model
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, bias="none",
                        target_modules=target_modules(train_attn, train_mlp, train_unembed))  # fmt: skip
    with warnings.catch_warnings():
        # tied embeddings + lm_head: peft warns that merging would be complicated; we never merge,
        # and the wrapped lm_head only changes the output projection (the embedding stays a plain
        # nn.Embedding sharing the frozen base weight).
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
    model.eval()
    return model


def lora_parameters(model) -> dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """Our tensor-name prefix ("layers.3.q", "unembed") -> (lora_A.weight, lora_B.weight) of a peft model."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in getattr(module, "lora_A", {}):
            continue
        if name == "lm_head" or name.endswith(".lm_head"):
            key = "unembed"
        else:
            m = _LAYER_RE.search(name)
            if m is None or m.group(2) not in _PROJ_OF:
                raise ValueError(f"unexpected LoRA module {name!r}")
            key = f"layers.{int(m.group(1))}.{_PROJ_OF[m.group(2)]}"
        if key in out:
            raise ValueError(f"two LoRA modules map to {key!r}")
        scaling = module.scaling["default"]
        if abs(scaling - LORA_ALPHA / module.r["default"]) > 1e-12:
            raise ValueError(f"{name}: peft scaling {scaling}, expected {LORA_ALPHA}/{module.r['default']}")
        out[key] = (module.lora_A["default"].weight, module.lora_B["default"].weight)
    return out


def named_lora_tensors(model) -> dict[str, torch.nn.Parameter]:
    """Our tensor name -> peft's parameter, for every LoRA tensor of a peft model."""
    out = {}
    for key, (a, b) in lora_parameters(model).items():
        out[f"{key}.lora_A"] = a
        out[f"{key}.lora_B"] = b
    return out


def load_adapter_values(model, tensors: dict[str, np.ndarray]) -> None:
    """Copies our named tensors into the peft model's lora_A / lora_B weights (same name set)."""
    params = named_lora_tensors(model)
    missing, extra = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or extra:
        raise KeyError(f"adapter tensor names differ from peft's: missing {missing[:6]} "
                       f"({len(missing)}), unexpected {extra[:6]} ({len(extra)})")  # fmt: skip
    with torch.no_grad():
        for name, p in params.items():
            value = np.asarray(tensors[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {tuple(value.shape)}, peft has {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(value)).to(p.dtype))


def adapter_values(model) -> dict[str, np.ndarray]:
    """The peft model's LoRA weights under our names (float32 numpy copies)."""
    return {k: p.detach().to(torch.float32).numpy().copy() for k, p in named_lora_tensors(model).items()}


def peft_gradients(model) -> dict[str, np.ndarray]:
    """The accumulated .grad of every LoRA tensor under our names (zeros where there is none)."""
    out = {}
    for name, p in named_lora_tensors(model).items():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = g.detach().to(torch.float64).numpy().copy()
    return out


def zero_gradients(model) -> None:
    for p in named_lora_tensors(model).values():
        p.grad = None


def to_float64(model):
    """A truly float64 copy of a (peft-wrapped) transformers model, to measure how far the float32
    reference itself is from exact arithmetic. `.double()` alone is not enough: transformers' RMSNorm
    computes in float32 and eager attention takes its softmax in float32; this copy uses the SDPA
    attention path (float64 throughout) and a float64 RMSNorm. Rotary cos/sin stay as transformers
    computes them (constants, not functions of the weights)."""
    m = copy.deepcopy(model).double()
    for module in m.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = "sdpa"
        if type(module).__name__.endswith("RMSNorm"):
            eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))

            def forward(x, module=module, eps=eps):
                return module.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

            module.forward = forward
    return m


def random_adapter_values(shapes: dict, seed: int, gain: float = 0.3) -> dict[str, np.ndarray]:
    """Random non-zero A and B for every tensor in `shapes` (name -> shape).

    A fresh adapter has B = 0, which makes every lora_A gradient zero; tests set these instead.
    A ~ N(0, 1/in) and B ~ N(0, (gain * sqrt(R) / 32)^2), so the LoRA delta scale * B A has entries
    of std gain / sqrt(in) for every rank: a modest change next to the base weights (std ~1.2/sqrt(in)
    in the tiny models), which keeps the model sane while every gradient is non-trivial."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("lora_A"):
            std = 1.0 / np.sqrt(shape[1])
        elif name.endswith("lora_B"):
            std = gain * np.sqrt(shape[1]) / LORA_ALPHA
        else:
            raise ValueError(f"not a LoRA tensor name: {name!r}")
        out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


# ---- losses -------------------------------------------------------------------------------------


def _as_tensor(x, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x), dtype=like.dtype, device=like.device)


def _clip_bounds(inputs: dict, loss_fn: str, config: dict | None, lp: torch.Tensor):
    lo_default, hi_default = CLIP_DEFAULTS[loss_fn]
    config = config or {}
    lo = config.get("clip_low_threshold", lo_default)
    hi = config.get("clip_high_threshold", hi_default)
    # undocumented per-token overrides (reference/tinker-api.md §6.6 notes)
    lo = _as_tensor(inputs["clip_low_threshold"], lp) if "clip_low_threshold" in inputs else torch.full_like(lp, lo)
    hi = _as_tensor(inputs["clip_high_threshold"], lp) if "clip_high_threshold" in inputs else torch.full_like(lp, hi)
    return lo, hi


def reference_loss_terms(lp: torch.Tensor, inputs: dict, loss_fn: str, config: dict | None = None) -> torch.Tensor:
    """One datum's per-token loss terms (lp's shape; the loss is their sum), differentiable in lp,
    exactly as the Tinker docs write the losses (reference/tinker-api.md §6.6).

    lp: the learner logprobs of target_tokens, [N] or [N, K]; inputs: the datum's loss_fn_inputs
    (numpy arrays of lp's shape). config: loss_fn_config (ppo / cispo clip thresholds, dro beta)."""
    config = dict(config or {})
    if loss_fn == "cross_entropy":
        weights = _as_tensor(inputs["weights"], lp)
        return -lp * weights
    advantages = _as_tensor(inputs["advantages"], lp)
    sampler = _as_tensor(inputs["logprobs"], lp)
    if loss_fn == "importance_sampling":
        return -(torch.exp(lp - sampler) * advantages)
    if loss_fn == "ppo":
        lo, hi = _clip_bounds(inputs, loss_fn, config, lp)
        ratio = torch.exp(lp - sampler)
        return -torch.min(ratio * advantages, torch.clamp(ratio, lo, hi) * advantages)
    if loss_fn == "cispo":
        lo, hi = _clip_bounds(inputs, loss_fn, config, lp)
        ratio = torch.exp(lp - sampler)
        return -(torch.clamp(ratio, lo, hi).detach() * lp * advantages)
    if loss_fn == "dro":
        beta = float(config["beta"])
        return -(lp * advantages - 0.5 * beta * (lp - sampler) ** 2)
    raise ValueError(f"unknown loss_fn {loss_fn!r}")


def reference_losses(lp: torch.Tensor, inputs: dict, loss_fn: str, config: dict | None = None) -> torch.Tensor:
    """One datum's loss (a scalar tensor, differentiable in lp): the per-token terms summed, never averaged."""
    return reference_loss_terms(lp, inputs, loss_fn, config).sum()


def loss_lp_gradients(logprobs: list[np.ndarray], data, loss_fn: str, config: dict | None = None):
    """Per datum: the per-token loss terms and d loss / d lp (float64 numpy, lp's shape), at the given
    logprobs. Σ|terms| and Σ|d loss / d lp| size the float32 tolerances of a loss value."""
    terms, grads = [], []
    for lp, (_, inputs) in zip(logprobs, data):
        x = torch.tensor(np.asarray(lp, dtype=np.float64), requires_grad=True)
        t = reference_loss_terms(x, inputs, loss_fn, config)
        t.sum().backward()
        terms.append(t.detach().numpy())
        grads.append(x.grad.numpy())
    return terms, grads


def reference_loss_value(logprobs: list[np.ndarray], data, loss_fn: str, config: dict | None = None) -> float:
    """The loss summed over datums, evaluated in float64 on given per-datum logprobs."""
    total = 0.0
    for lp, (_, inputs) in zip(logprobs, data):
        total += float(reference_losses(torch.as_tensor(np.asarray(lp, dtype=np.float64)), inputs, loss_fn, config))
    return total


# ---- forward / backward ---------------------------------------------------------------------------


def datum_logprobs(model, tokens, target_tokens) -> torch.Tensor:
    """log_softmax(logits) of one sequence gathered at target_tokens ([N] or [N, K])."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    logits = model(input_ids=ids, use_cache=False).logits[0]
    logp = logits.log_softmax(-1)
    targets = torch.as_tensor(np.asarray(target_tokens, dtype=np.int64))
    if targets.ndim == 1:
        return logp.gather(-1, targets[:, None])[:, 0]
    if targets.ndim == 2:
        return logp.gather(-1, targets)
    raise ValueError(f"target_tokens must be [N] or [N, K], got shape {tuple(targets.shape)}")


def reference_forward_backward(model, data, loss_fn: str = "cross_entropy", config: dict | None = None,
                               *, backward: bool = True) -> tuple[list[np.ndarray], float]:  # fmt: skip
    """Runs every datum through the peft model, sums the loss over datums and (with backward)
    accumulates its gradient into the LoRA weights' .grad. Returns (per-datum logprobs, loss)."""
    logprobs, total = [], None
    with torch.set_grad_enabled(backward):
        for tokens, inputs in data:
            lp = datum_logprobs(model, tokens, inputs["target_tokens"])
            loss = reference_losses(lp, inputs, loss_fn, config)
            total = loss if total is None else total + loss
            logprobs.append(lp.detach().numpy().copy())  # float32, or float64 for a to_float64 model
        if backward:
            total.backward()
    return logprobs, float(total.detach())


# ---- AdamW ----------------------------------------------------------------------------------------

ADAM_DEFAULTS = dict(learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0, grad_clip_norm=0.0)


@dataclass
class TorchAdamW:
    """torch.optim.AdamW over named float32 tensors, one step at a time with that step's hyperparameters."""

    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)
    optimizer: torch.optim.AdamW | None = None
    last_grad_norm: float = float("nan")

    @classmethod
    def create(cls, params: dict[str, np.ndarray]) -> "TorchAdamW":
        tensors = {k: torch.nn.Parameter(torch.tensor(np.asarray(v, dtype=np.float32))) for k, v in params.items()}
        opt = torch.optim.AdamW(list(tensors.values()), lr=1e-4, foreach=False)
        return cls(tensors, opt)

    def set_parameters(self, params: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(params[k], dtype=np.float32)))

    def step(self, grads: dict[str, np.ndarray], **hparams) -> float:
        """One step; returns the global gradient norm before clipping."""
        unknown = set(hparams) - set(ADAM_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown AdamW hyperparameters {sorted(unknown)}")
        h = {**ADAM_DEFAULTS, **hparams}
        for k, p in self.params.items():
            p.grad = torch.tensor(np.asarray(grads[k], dtype=np.float32))
        plist = list(self.params.values())
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in plist]))
        if h["grad_clip_norm"] > 0:
            norm = torch.nn.utils.clip_grad_norm_(plist, h["grad_clip_norm"], foreach=False)
        self.last_grad_norm = float(norm)
        group = self.optimizer.param_groups[0]
        group.update(lr=h["learning_rate"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                     weight_decay=h["weight_decay"])  # fmt: skip
        self.optimizer.step()
        for p in plist:
            p.grad = None
        return self.last_grad_norm

    def parameters(self) -> dict[str, np.ndarray]:
        return {k: p.detach().numpy().copy() for k, p in self.params.items()}

    def state(self) -> dict:
        """{"step", "exp_avg", "exp_avg_sq"} in the layout of LoraAdapter.optimizer_state()."""
        steps = {int(self.optimizer.state[p]["step"]) for p in self.params.values() if p in self.optimizer.state}
        out = {"step": steps.pop() if len(steps) == 1 else 0, "exp_avg": {}, "exp_avg_sq": {}}
        for k, p in self.params.items():
            s = self.optimizer.state.get(p, {})
            zeros = np.zeros(tuple(p.shape), dtype=np.float32)
            out["exp_avg"][k] = s["exp_avg"].numpy().copy() if "exp_avg" in s else zeros
            out["exp_avg_sq"][k] = s["exp_avg_sq"].numpy().copy() if "exp_avg_sq" in s else zeros.copy()
        return out


def torch_adamw_step(params: dict[str, np.ndarray] | None, grads: dict[str, np.ndarray],
                     state: TorchAdamW | None = None, hparams: dict | None = None):  # fmt: skip
    """One torch AdamW step (with clip_grad_norm_ over all tensors when grad_clip_norm > 0).

    state: None for the first step (a new optimizer over `params`), or the TorchAdamW returned by
    the previous call; `params`, when given, overwrite the current values first (to compare step by
    step from identical starting points), while the moments and the step count carry over.
    Returns (parameters after the step, state)."""
    if state is None:
        if params is None:
            raise ValueError("the first step needs params")
        state = TorchAdamW.create(params)
    elif params is not None:
        state.set_parameters(params)
    state.step(grads, **(hparams or {}))
    return state.parameters(), state
