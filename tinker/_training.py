"""LoRA training on the engine: adapters, forward / forward_backward with Tinker's losses, AdamW.

This is the layer the TrainingClient stands on. A LoraAdapter lives on a loaded base model (many
adapters share one model); its requests run in the engine strictly in the order they are made, so
gradients accumulate over forward_backward calls until optim_step applies and clears them.

Data are (tokens, loss_fn_inputs) pairs: position i of `tokens` predicts `target_tokens[i]` (one id,
or K ids for [N, K] soft targets), with per-target float arrays of the same shape. Losses are
summed over targets and datums, never averaged (tinker-api.md §6.6).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import numpy as np

from ._engine import LoadedModel, bool_arg, get_engine, int_arg, seed_arg, token_ids
from ._exceptions import BadRequestError
from ._multimodal import EngineInput
from ._multimodal import pack as pack_images

# The engine's loss ids are the indices here (csrc/model/loss.h)
LOSS_FUNCTIONS = ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo", "stable_reinforce")

# loss_fn_config keys each loss accepts, with defaults (None: required)
_CONFIG_DEFAULTS = {
    "cross_entropy": {},
    "importance_sampling": {},
    "ppo": {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2},
    # the current Tinker tutorial's one-sided default; older docs used (0.8, 1.2)
    "cispo": {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
    "dro": {"beta": None},
    # ratio bounds 1 - eps_low, 1 + eps_high with the GSPO paper's eps (3e-4, 4e-4): the sequence ratio,
    # a geometric mean over the sampled tokens, stays much closer to 1 than a token's
    "gspo": {"clip_low_threshold": 1.0 - 3e-4, "clip_high_threshold": 1.0 + 4e-4},
    "stable_reinforce": {},
}

# loss_fn_inputs each loss reads (besides target_tokens); other known keys are accepted and ignored
_INPUTS = {
    "cross_entropy": ("weights",),
    "importance_sampling": ("advantages", "logprobs"),
    "ppo": ("advantages", "logprobs"),
    "cispo": ("advantages", "logprobs"),
    "dro": ("advantages", "logprobs"),
    "gspo": ("advantages", "logprobs", "sequence_ratio_mask"),
    "stable_reinforce": ("advantages", "logprobs"),
}
_OPTIONAL_INPUTS = {"ppo": ("clip_low_threshold", "clip_high_threshold"),
                    "cispo": ("clip_low_threshold", "clip_high_threshold"),
                    "gspo": ("clip_low_threshold", "clip_high_threshold")}
KNOWN_INPUTS = ("target_tokens", "weights", "advantages", "logprobs", "clip_low_threshold", "clip_high_threshold",
                "sequence_ratio_mask")

PARAMS, GRADS, EXP_AVG, EXP_AVG_SQ = 1, 2, 4, 8  # parts of the adapter's state block


@dataclass
class TrainResult:
    logprobs: list[np.ndarray]                 # per datum, shaped like its target_tokens
    metrics: dict[str, float] = field(default_factory=dict)


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "to_numpy"):            # tinker TensorData
        return np.asarray(value.to_numpy())
    if hasattr(value, "detach"):              # torch.Tensor
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _check_loss(loss_fn: str, loss_fn_config) -> dict:
    if loss_fn not in _CONFIG_DEFAULTS:
        raise BadRequestError(f"unknown loss_fn {loss_fn!r}; choose one of {', '.join(LOSS_FUNCTIONS)}")
    defaults = _CONFIG_DEFAULTS[loss_fn]
    config = dict(loss_fn_config or {})
    unknown = sorted(set(config) - set(defaults))
    if unknown:
        allowed = ", ".join(defaults) if defaults else "none"
        raise BadRequestError(f"loss_fn_config key(s) {', '.join(map(repr, unknown))} are not used by {loss_fn!r} "
                              f"(it takes: {allowed})")
    out = {}
    for key, default in defaults.items():
        value = config.get(key, default)
        if value is None:
            raise BadRequestError(f"{loss_fn!r} needs loss_fn_config[{key!r}] (e.g. {{{key!r}: 0.05}})")
        try:
            value = float(value)
        except OverflowError:
            raise BadRequestError(f"loss_fn_config[{key!r}] is {value!r}, too large for a float") from None
        except (TypeError, ValueError):
            raise BadRequestError(f"loss_fn_config[{key!r}] must be a number, got {value!r}") from None
        if not np.isfinite(value):
            raise BadRequestError(f"loss_fn_config[{key!r}] must be finite, got {value}")
        out[key] = value
    return out


def _pack(data, loss_fn: str, vocab_size: int) -> dict:
    """Flattens the datums into the engine's buffers, checking shapes and keys per datum. A datum's tokens may be
    a tinker._multimodal.EngineInput (its image positions count as tokens: the targets cover them too)."""
    if not isinstance(data, (list, tuple)) or len(data) == 0:
        raise BadRequestError("No data provided: pass a non-empty list of datums")
    needed = _INPUTS[loss_fn]
    used = needed + _OPTIONAL_INPUTS.get(loss_fn, ())
    tokens, lens, ks, targets, shapes, sequences = [], [], [], [], [], []
    floats = {key: [] for key in used}
    for i, datum in enumerate(data):
        try:
            model_tokens, inputs = datum
        except (TypeError, ValueError):
            raise BadRequestError(f"datum {i}: expected (tokens, loss_fn_inputs)") from None
        image = model_tokens if isinstance(model_tokens, EngineInput) else None
        if image is not None:
            model_tokens = image.tokens
        ids = token_ids(model_tokens if isinstance(model_tokens, (list, tuple)) else _to_numpy(model_tokens),
                        vocab_size, f"sequence {i}", f"datum {i}: model_input")
        sequences.append(image if image is not None else ids)
        if not isinstance(inputs, dict):
            raise BadRequestError(f"datum {i}: loss_fn_inputs must be a dict")
        unknown = sorted(set(inputs) - set(KNOWN_INPUTS))
        if unknown:
            raise BadRequestError(f"datum {i}: unknown loss_fn_inputs key(s) {', '.join(map(repr, unknown))} "
                                  f"(known: {', '.join(KNOWN_INPUTS)})")
        if "target_tokens" not in inputs:
            raise BadRequestError(f"datum {i}: loss_fn_inputs has no 'target_tokens'")
        tgt = _to_numpy(inputs["target_tokens"])
        if tgt.ndim not in (1, 2) or tgt.shape[0] != ids.size or tgt.size == 0:
            images = (f" ({image.n_image_tokens} of them the positions of {len(image.image_spans)} image(s), which "
                      f"loss_fn_inputs must cover too, usually with weight 0)") if image is not None else ""
            raise BadRequestError(f"datum {i}: target_tokens has shape {tgt.shape}, but model_input has {ids.size} "
                                  f"tokens{images}: it must be [{ids.size}] or [{ids.size}, K]")
        if not np.issubdtype(tgt.dtype, np.integer):
            if not (np.issubdtype(tgt.dtype, np.floating) and np.all(np.isfinite(tgt)) and np.all(tgt == np.round(tgt))):
                raise BadRequestError(f"datum {i}: target_tokens must hold integer token ids, got dtype {tgt.dtype}")
        bad = (tgt < 0) | (tgt >= vocab_size)
        if bad.any():
            index = np.argwhere(bad)[0]
            raise BadRequestError(f"datum {i}: target_tokens{list(map(int, index))} = {int(tgt[tuple(index)])} is "
                                  f"outside the vocabulary [0, {vocab_size})")
        for key in needed:
            if key not in inputs:
                raise BadRequestError(f"datum {i}: {loss_fn} needs loss_fn_inputs[{key!r}]")
        for key in used:
            if key not in inputs:
                continue
            values = _to_numpy(inputs[key]).astype(np.float32, copy=False)
            if values.shape != tgt.shape:
                raise BadRequestError(f"datum {i}: {key} has shape {values.shape}, but target_tokens has {tgt.shape}")
            if not np.all(np.isfinite(values)):
                index = np.argwhere(~np.isfinite(values))[0]
                raise BadRequestError(f"datum {i}: {key}{list(map(int, index))} is {values[tuple(index)]}; it must "
                                      f"be finite")
            floats[key].append(values.reshape(-1))
        if any(floats[key] and len(floats[key]) != i + 1 for key in used):
            raise BadRequestError(f"datum {i}: every datum must give the same loss_fn_inputs keys")
        tokens.append(ids)
        lens.append(ids.size)
        ks.append(1 if tgt.ndim == 1 else tgt.shape[1])
        targets.append(tgt.reshape(-1))
        shapes.append(tgt.shape)
    packed = {
        "tokens": np.concatenate(tokens),
        "seq_lens": np.array(lens, dtype=np.int32),
        "k_per_datum": np.array(ks, dtype=np.int32),
        "targets": np.concatenate(targets).astype(np.int32),
        "shapes": shapes,
        "mm": pack_images(sequences),
    }
    names = {"weights": "weights", "advantages": "advantages", "logprobs": "logprobs",
             "clip_low_threshold": "clip_low", "clip_high_threshold": "clip_high", "sequence_ratio_mask": "ratio_mask"}
    for key, name in names.items():
        parts = floats.get(key)
        packed[name] = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32) if parts else None
    return packed


class PendingTrain:
    """A queued forward / forward_backward: result() waits and unpacks it."""

    def __init__(self, request, shapes):
        self._request = request
        self._shapes = shapes
        self._result: TrainResult | None = None

    def result(self) -> TrainResult:
        if self._result is None:
            try:
                view, loss, expert_tokens, _pass_requests = self._request.result()
            except ValueError as e:
                raise BadRequestError(str(e)) from e
            flat = np.asarray(view)
            logprobs, at = [], 0
            for shape in self._shapes:
                n = int(np.prod(shape))
                logprobs.append(flat[at:at + n].reshape(shape).copy())
                at += n
            metrics = {"loss:sum": float(loss)}
            if expert_tokens is not None:
                metrics.update(moe_metrics(expert_tokens))
            self._result = TrainResult(logprobs, metrics)
        return self._result


def moe_metrics(expert_tokens) -> dict[str, float]:
    """The routing-balance metrics Tinker reports for an MoE model, from the (token, expert) assignments each
    expert received in each sparse layer over the whole request ([layers][E]; qwen3-moe-vl.md §1.8).

    Per layer, perfect balance is an equal share of the assignments, T k / E (T tokens, k experts per token;
    the reading under which the documented signs hold: min violation <= 0 <= max violation):
    frac_with_tokens = experts with >= 1 token / E, frac_oversubscribed = experts above perfect / E,
    max (min) violation = (max (min) tokens - perfect) / perfect; then the mean over layers (and the max for
    the max violation)."""
    counts = np.asarray(expert_tokens, dtype=np.float64)  # [layers, E]
    perfect = counts.sum(axis=1) / counts.shape[1]
    max_violation = (counts.max(axis=1) - perfect) / perfect
    return {
        "e_frac_with_tokens:mean": float(np.mean((counts > 0).mean(axis=1))),
        "e_frac_oversubscribed:mean": float(np.mean((counts > perfect[:, None]).mean(axis=1))),
        "e_max_violation:mean": float(np.mean(max_violation)),
        "e_max_violation:max": float(np.max(max_violation)),
        "e_min_violation:mean": float(np.mean((counts.min(axis=1) - perfect) / perfect)),
    }


def optim_metrics(request, learning_rate) -> dict:
    """The metrics of a finished optim_step request, with Tinker's `name:reduction` keys."""
    out = request.result()
    return {"grad_norm:mean": out["grad_norm"], "grad_clip_scale:mean": out["clip_scale"],
            "learning_rate:mean": float(learning_rate), "step:max": float(out["step"])}


def split_tensors(flat: np.ndarray, layout) -> dict[str, np.ndarray]:
    """Named copies of an adapter's tensors from its flat state; layout: (name, offset, rows, cols, shape), shape
    (rows, cols) or, for the experts' factors, (experts, rows / experts, cols)."""
    return {name: flat[offset:offset + rows * cols].reshape(shape).copy()
            for name, offset, rows, cols, shape in layout}


@dataclass
class LoraSnapshot:
    """Frozen LoRA weights for sampling: later training of the adapter does not change them."""

    model: LoadedModel
    handle: object

    def parameters(self) -> dict[str, np.ndarray]:
        view, _ = get_engine().read_adapter(self.handle, PARAMS).result()
        return split_tensors(np.asarray(view), self.handle.tensors)


class LoraAdapter:
    """A LoRA adapter on a loaded base model: alpha 32, scale 32 / rank, A seeded random, B zero."""

    alpha = 32.0

    def __init__(self, model: LoadedModel, rank: int = 32, seed: int | None = None, train_mlp: bool = True,
                 train_attn: bool = True, train_unembed: bool = True):
        train_mlp, train_attn, train_unembed = (bool_arg(name, value) for name, value in (
            ("train_mlp", train_mlp), ("train_attn", train_attn), ("train_unembed", train_unembed)))
        rank = int_arg("LoRA rank", rank, 1, 256)
        if not (train_mlp or train_attn or train_unembed):
            raise BadRequestError("at least one of train_mlp, train_attn, train_unembed must be True")
        self.model = model
        self.rank = rank
        self.scale = self.alpha / rank
        self.seed = secrets.randbits(63) if seed is None else seed_arg("seed", seed)
        self.train_mlp, self.train_attn, self.train_unembed = bool(train_mlp), bool(train_attn), bool(train_unembed)
        self.handle = get_engine().create_adapter(model.handle, rank, self.seed, self.train_attn, self.train_mlp,
                                                  self.train_unembed)
        self._layout = {name: (offset, tuple(shape)) for name, offset, _rows, _cols, shape in self.handle.tensors}

    # ---- training -------------------------------------------------------------------------

    def submit(self, data, loss_fn: str = "cross_entropy", loss_fn_config=None, backward: bool = True,
               notify: bool = False) -> PendingTrain:
        config = _check_loss(loss_fn, loss_fn_config)
        packed = _pack(data, loss_fn, self.model.vocab_size)
        try:
            request = get_engine().train(
                self.handle, packed["tokens"], packed["seq_lens"], packed["k_per_datum"], packed["targets"],
                weights=packed["weights"], advantages=packed["advantages"], logprobs=packed["logprobs"],
                clip_low=packed["clip_low"], clip_high=packed["clip_high"], loss=LOSS_FUNCTIONS.index(loss_fn),
                clip_low_threshold=config.get("clip_low_threshold", 0.0),
                clip_high_threshold=config.get("clip_high_threshold", 0.0), beta=config.get("beta", 0.0),
                backward=backward, notify=notify, ratio_mask=packed["ratio_mask"], mm=packed["mm"])
        except ValueError as e:
            raise BadRequestError(str(e)) from e
        return PendingTrain(request, packed["shapes"])

    def forward_backward(self, data, loss_fn: str = "cross_entropy", loss_fn_config=None) -> TrainResult:
        return self.submit(data, loss_fn, loss_fn_config, backward=True).result()

    def forward(self, data, loss_fn: str = "cross_entropy", loss_fn_config=None) -> TrainResult:
        return self.submit(data, loss_fn, loss_fn_config, backward=False).result()

    def submit_optim_step(self, learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0,
                          grad_clip_norm=0.0, notify: bool = False):
        try:
            return get_engine().optim_step(self.handle, float(learning_rate), float(beta1), float(beta2), float(eps),
                                           float(weight_decay), float(grad_clip_norm), notify=notify)
        except (TypeError, ValueError) as e:
            raise BadRequestError(f"invalid AdamParams: {e}") from e

    def optim_step(self, learning_rate=1e-4, beta1=0.9, beta2=0.95, eps=1e-12, weight_decay=0.0,
                   grad_clip_norm=0.0) -> dict:
        request = self.submit_optim_step(learning_rate, beta1, beta2, eps, weight_decay, grad_clip_norm)
        return optim_metrics(request, learning_rate)

    def submit_snapshot(self, notify: bool = False):
        """Queues a frozen copy of the weights, taken at this call's place in the queue."""
        return get_engine().snapshot_adapter(self.handle, notify=notify)

    def snapshot(self) -> "LoraSnapshot":
        """A frozen copy of the weights as of this call's place in the queue, for sampling."""
        return LoraSnapshot(self.model, self.submit_snapshot().result())

    # ---- tensors --------------------------------------------------------------------------

    def _read(self, parts: int) -> tuple[np.ndarray, int]:
        view, step = get_engine().read_adapter(self.handle, parts).result()
        return np.asarray(view), step

    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        return split_tensors(flat, self.handle.tensors)

    def parameters(self) -> dict[str, np.ndarray]:
        return self._split(self._read(PARAMS)[0])

    def gradients(self) -> dict[str, np.ndarray]:
        return self._split(self._read(GRADS)[0])

    def optimizer_state(self) -> dict:
        flat, step = self._read(EXP_AVG | EXP_AVG_SQ)
        n = self.handle.n_params
        return {"step": step, "exp_avg": self._split(flat[:n]), "exp_avg_sq": self._split(flat[n:])}

    # ---- whole-state reads and writes (checkpoints) --------------------------------------

    def submit_read(self, parts: int, notify: bool = False):
        """Queues a copy of the given parts of the state (PARAMS | EXP_AVG | ...)."""
        return get_engine().read_adapter(self.handle, parts, notify=notify)

    def unpack_read(self, request, with_optimizer: bool):
        """(params, (exp_avg, exp_avg_sq) or None, step) from a finished submit_read of PARAMS (and
        the moments when with_optimizer)."""
        view, step = request.result()
        flat = np.asarray(view)
        n = self.handle.n_params
        params = self._split(flat[:n])
        moments = (self._split(flat[n:2 * n]), self._split(flat[2 * n:3 * n])) if with_optimizer else None
        return params, moments, int(step)

    def flatten(self, tensors: dict[str, np.ndarray], what: str) -> np.ndarray:
        """The flat float32 vector of a full set of named tensors, checked against this adapter's layout."""
        missing = sorted(set(self._layout) - set(tensors))
        unknown = sorted(set(tensors) - set(self._layout))
        if missing or unknown:
            detail = f"missing {missing[:3]}" if missing else f"unexpected {unknown[:3]}"
            raise BadRequestError(f"{what} does not match this adapter (rank {self.rank}, train_attn={self.train_attn}, "
                                  f"train_mlp={self.train_mlp}, train_unembed={self.train_unembed}): {detail}")
        flat = np.empty(self.handle.n_params, dtype=np.float32)
        for name, (offset, shape) in self._layout.items():
            array = np.asarray(tensors[name], dtype=np.float32)
            if array.shape != shape:
                raise BadRequestError(f"{what}: tensor {name!r} has shape {array.shape}, this adapter needs {shape}")
            flat[offset:offset + array.size] = array.reshape(-1)
        return flat

    def submit_write_all(self, params: np.ndarray, exp_avg: np.ndarray | None, exp_avg_sq: np.ndarray | None,
                         step: int, notify: bool = False):
        """Queues replacing the whole state: params, zero gradients, the moments (zero when None) and step."""
        zeros = np.zeros_like(params)
        state = np.concatenate([params, zeros, zeros if exp_avg is None else exp_avg,
                                zeros if exp_avg_sq is None else exp_avg_sq])
        try:
            return get_engine().write_adapter(self.handle, PARAMS | GRADS | EXP_AVG | EXP_AVG_SQ, state, int(step),
                                              notify=notify)
        except ValueError as e:
            raise BadRequestError(str(e)) from e

    def set_parameters(self, tensors: dict) -> None:
        flat = self._read(PARAMS)[0].copy()
        for name, value in tensors.items():
            if name not in self._layout:
                raise BadRequestError(f"unknown LoRA tensor {name!r} (this adapter has e.g. {next(iter(self._layout))!r})")
            offset, shape = self._layout[name]
            array = _to_numpy(value).astype(np.float32, copy=False)
            if array.shape != shape:
                raise BadRequestError(f"LoRA tensor {name!r} must have shape {shape}, got {array.shape}")
            if not np.all(np.isfinite(array)):
                raise BadRequestError(f"LoRA tensor {name!r} has non-finite values")
            flat[offset:offset + array.size] = array.reshape(-1)
        get_engine().write_adapter(self.handle, PARAMS, flat).result()
