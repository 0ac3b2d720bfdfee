"""Qwen3-MoE (transformers' Qwen3MoeForCausalLM, GGUF qwen3moe) on tiny random checkpoints.

Models (tiny_models, float32, eager attention and eager experts, routers scaled so top-k gaps are clear):
- "norm": 3 layers, layer 1 dense (mlp_only_layers), 8 experts of width 96, top 2, norm_topk_prob True;
- "nonorm": 4 layers, decoder_sparse_step 2 (layers 1, 3 sparse), norm_topk_prob False;
- "fused": the "norm" weights written in transformers 5.x's fused in-memory layout (mlp.experts.gate_up_proj
  [E, 2I, H], down_proj [E, H, I]); transformers 5.25's save_pretrained writes per-expert names
  (mlp.experts.{e}.gate_proj.weight ...), which the other checkpoints have (checked below);
- GGUF files of "norm" written like llama.cpp's converter (ffn_{gate,up,down}_exps 3-D, ffn_gate_inp router),
  F32 and Q8_0.

What is checked, with the tolerances:
- logits of the engine vs transformers: |diff| <= 1e-3 * max(1, |logit|) at every position; logprobs through
  the public API (ServiceClient / SamplingClient.compute_logprobs) within 2e-3 absolute (reached: ~1e-5);
  the fused checkpoint and the F32 GGUF give the per-expert checkpoint's logits within 1e-5 (same weights);
  the Q8_0 GGUF equals transformers on its dequantised weights within 1e-3;
- LoRA gradients (attention, the dense layer's MLP, the experts in Tinker's shared-outer layout, unembed) vs a
  torch autograd reference written by hand on the same weights (peft for attention and lm_head, each MLP's
  forward replaced by one carrying the LoRA terms, the shared factors broadcast, so autograd sums their
  gradient over experts; the router's top-k weights stay differentiable as in transformers): per tensor
  ||g - g_ref|| / ||g_ref|| <= 1e-3, logprobs within 1e-4;
- greedy sampling equals transformers' generate (base model through the public API, and with an adapter);
- save_state / load_state(_with_optimizer) round-trip an MoE adapter, whose PEFT file has Tinker's names and
  shapes (mlp.experts.w1.lora_A.weight [1, r, H], lora_B [E, I, r]; w3 likewise; w2 lora_A [E, r, I],
  lora_B [1, H, r]); a sampler checkpoint samples like the live adapter; its exported adapter directory
  trains on; export --merge refuses an MoE base (not supported yet).
Test sequences are drawn (redrawn where needed) so that the reference's routing has a gap > 1e-4 between the
k-th and (k+1)-th router probability at every token and sparse layer: float32 noise cannot flip a routing
decision (the engine's router probabilities differ from transformers' by ~1e-7).
"""

from __future__ import annotations

import json
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gguf")

import reference_sampling as rs  # noqa: E402  (tests/ is on sys.path under pytest's rootdir conftest)
import reference_training as rt  # noqa: E402
import tiny_models as tm  # noqa: E402

import tinker  # noqa: E402
from tinker import _checkpoints as ckpt  # noqa: E402
from tinker import _sampling, _training, types  # noqa: E402
from tinker._engine import load_model  # noqa: E402
from tinker._exceptions import ModelLoadError  # noqa: E402

LOGIT_TOL = 1e-3  # vs transformers, relative to max(1, |logit|)
API_LP_TOL = 2e-3  # public-API logprobs vs transformers, absolute
SAME_TOL = 1e-5  # the same weights in another file layout
GRAD_RTOL = 1e-3  # per LoRA tensor, ||g - g_ref|| / ||g_ref||
LP_ATOL = 1e-4  # training logprobs vs the reference
ROUTING_GAP = 1e-4  # the reference's k-th vs (k+1)-th router probability, at least (module docstring)
LENGTHS = (1, 9, 40, 130)
GREEDY_TOKENS = 24

MODELS = {
    "norm": dict(seed=1, layers=3, mlp_only_layers=[1], norm_topk_prob=True),
    "nonorm": dict(seed=2, layers=4, sparse_step=2, norm_topk_prob=False),
}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _sequences(name: str, vocab: int, lengths=LENGTHS, model=None) -> list[np.ndarray]:
    """Random token sequences; with a model, each redrawn until its routing is clear (routing_gap)."""
    rng = np.random.default_rng(_seed("seqs", name, lengths))
    out = []
    for n in lengths:
        for _ in range(200):
            seq = rng.integers(0, vocab, size=n)
            if model is None or routing_gap(model, seq) > ROUTING_GAP:
                break
        else:
            raise AssertionError(f"{name}: no sequence of length {n} with a clear routing in 200 draws")
        out.append(seq)
    return out


# ---- the models ---------------------------------------------------------------------------------------------


class Models:
    """Tiny checkpoints, built on first use: name -> (path, float32 transformers reference)."""

    def __init__(self, root: Path):
        self.root = root
        self.built: dict[str, tuple[Path, object]] = {}
        self.engines: dict[str, object] = {}

    def get(self, name: str) -> tuple[Path, object]:
        if name in self.built:
            return self.built[name]
        if name in MODELS:
            kwargs = dict(MODELS[name])
            seed = kwargs.pop("seed")
            path, ref = tm.make_hf_checkpoint(self.root / name, "qwen3moe", seed=seed, vocab=320,
                                              max_positions=512, **kwargs)  # fmt: skip
        elif name == "fused":
            path, ref = self.get("norm")
            path = write_fused_checkpoint(path, ref, self.root / "fused")
        elif name.startswith("gguf_"):
            _, ref = self.get("norm")
            path, ref = tm.write_gguf(self.root / f"{name}.gguf", ref, "qwen3moe", name.split("_", 1)[1])
            ref.config._experts_implementation = "eager"
        else:
            raise KeyError(name)
        self.built[name] = (path, ref.eval())
        return self.built[name]

    def engine(self, name: str):
        if name not in self.engines:
            self.engines[name] = load_model(str(self.get(name)[0]))
        return self.engines[name]


def write_fused_checkpoint(source: Path, reference, directory: Path) -> Path:
    """The reference's in-memory state dict (transformers 5.x: 3-D expert parameters) as model.safetensors,
    with the source checkpoint's config."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "config.json", directory / "config.json")
    state = {k: v.detach().contiguous() for k, v in reference.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state), "transformers holds no fused experts"
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Models:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return Models(tmp_path_factory.mktemp("qwen3_moe"))


def safetensors_keys(path: Path) -> dict[str, list[int]]:
    """{name: shape} of a safetensors file (or a checkpoint directory's model.safetensors)."""
    from tinker._models import read_safetensors_header

    path = path / "model.safetensors" if path.is_dir() else path
    return {k: v[1] for k, v in read_safetensors_header(path).items()}


# ---- the reference's routing ----------------------------------------------------------------------------------


@torch.no_grad()
def routing_gap(model, tokens) -> float:
    """The smallest gap between the k-th and (k+1)-th router probability over tokens and sparse layers."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
    out = model(input_ids=ids, use_cache=False, output_router_logits=True)
    config = getattr(model, "config", None) or model.base_model.model.config
    k = config.num_experts_per_tok
    gaps = []
    for logits in out.router_logits:
        p = torch.softmax(logits.float(), dim=-1).sort(dim=-1, descending=True).values
        gaps.append(float((p[:, k - 1] - p[:, k]).min()))
    return min(gaps)



# ---- comparisons ----------------------------------------------------------------------------------------------


def assert_logits_close(got, want, tol: float, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    err = np.abs(got.astype(np.float64) - want)
    bound = tol * np.maximum(1.0, np.abs(want))
    worst = np.unravel_index(np.argmax(err / bound), err.shape)
    assert (err <= bound).all(), (f"{what}: {int((err > bound).sum())} logits beyond {tol:g}*max(1,|logit|); worst "
                                  f"at {tuple(map(int, worst))}: {got[worst]:.6g} vs {want[worst]:.6g}")


@pytest.mark.parametrize("name", list(MODELS))
def test_save_pretrained_writes_per_expert_tensors(models, name):
    """transformers 5.25 saves the experts under per-expert names (it reverts its fused in-memory layout)."""
    path, ref = models.get(name)
    keys = safetensors_keys(path)
    config = ref.config
    sparse = [i for i in range(config.num_hidden_layers) if tm.moe_layer(config, i)]
    assert sparse and len(sparse) < config.num_hidden_layers, "both kinds of layer are covered"
    for i in sparse:
        assert keys[f"model.layers.{i}.mlp.experts.0.gate_proj.weight"] == [96, 64]
        assert keys[f"model.layers.{i}.mlp.experts.7.down_proj.weight"] == [64, 96]
        assert keys[f"model.layers.{i}.mlp.gate.weight"] == [8, 64]
    dense = [i for i in range(config.num_hidden_layers) if i not in sparse]
    for i in dense:
        assert keys[f"model.layers.{i}.mlp.gate_proj.weight"] == [128, 64]
    fused = safetensors_keys(models.get("fused")[0])
    assert fused["model.layers.0.mlp.experts.gate_up_proj"] == [8, 192, 64]
    assert fused["model.layers.0.mlp.experts.down_proj"] == [8, 64, 96]


@pytest.mark.parametrize("name", [*MODELS, "fused", "gguf_F32", "gguf_Q8_0"])
def test_config_and_layers(models, name):
    path, ref = models.get(name)
    engine = models.engine(name)
    want = tm.expected_engine_config(ref.config)
    got = engine.handle.config
    for key in ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "n_experts", "n_experts_used",
                "d_ff_expert", "norm_topk_prob", "moe_layers"):
        assert got[key] == want[key], f"{name}: {key} = {got[key]!r}, expected {want[key]!r}"
    assert engine.config["moe"] == 1 and engine.config["arch"] == "qwen3moe"


@pytest.mark.parametrize("name", list(MODELS))
def test_logits_match_transformers(models, name):
    path, ref = models.get(name)
    seqs = _sequences(name, ref.config.vocab_size, model=ref)
    got = models.engine(name).forward_logits(seqs)  # one packed batch
    for seq, logits in zip(seqs, got):
        assert_logits_close(logits, tm.reference_logits(ref, seq), LOGIT_TOL, f"{name}, length {len(seq)}")


@pytest.mark.parametrize("name", list(MODELS))
def test_public_api_logprobs_match_transformers(models, name):
    path, ref = models.get(name)
    client = tinker.ServiceClient().create_sampling_client(base_model=str(path))
    for seq in _sequences(name, ref.config.vocab_size, (2, 57), model=ref):
        got = client.compute_logprobs(types.ModelInput.from_ints(seq.tolist())).result()
        want = torch.log_softmax(torch.from_numpy(tm.reference_logits(ref, seq)).double(), -1).numpy()
        want = [want[i - 1, seq[i]] for i in range(1, len(seq))]
        assert got[0] is None and len(got) == len(seq)
        err = np.abs(np.asarray(got[1:], dtype=np.float64) - want).max()
        assert err <= API_LP_TOL, f"{name}: logprobs differ from transformers by {err:.3g}"


@pytest.mark.parametrize("name", ["fused", "gguf_F32"])
def test_other_layouts_give_the_same_logits(models, name):
    """The same weights, fused 3-D in safetensors or as GGUF's 3-D expert tensors: the same logits."""
    seqs = _sequences(name, 320)
    want = models.engine("norm").forward_logits(seqs)
    got = models.engine(name).forward_logits(seqs)
    for seq, g, w in zip(seqs, got, want):
        assert_logits_close(g, w.astype(np.float64), SAME_TOL, f"{name} vs per-expert safetensors, length {len(seq)}")


def test_quantized_gguf_matches_its_dequantised_reference(models):
    path, ref = models.get("gguf_Q8_0")
    engine = models.engine("gguf_Q8_0")
    assert engine.handle.quantized_bytes > 0
    seqs = _sequences("gguf_Q8_0", 320, model=ref)
    for seq, logits in zip(seqs, engine.forward_logits(seqs)):
        assert_logits_close(logits, tm.reference_logits(ref, seq), LOGIT_TOL, f"Q8_0 GGUF, length {len(seq)}")


def test_transposed_fused_layout_gives_the_same_logits(models, tmp_path):
    """[E, D, 2I] / [E, I, D] (the x @ W[e] orientation of Qwen3-VL-MoE's hub files), in F32 and BF16: each
    expert's matrices are gathered column by column, giving the per-expert checkpoint's logits (F32: 1e-5; BF16:
    the same as the BF16 values stored the engine's way)."""
    from safetensors.torch import save_file

    path, ref = models.get("norm")
    seqs = _sequences("transposed", 320)
    state = {k: v.detach().contiguous() for k, v in ref.state_dict().items()}
    for dtype in (torch.float32, torch.bfloat16):
        out = tmp_path / str(dtype).split(".")[-1]
        out.mkdir()
        shutil.copyfile(path / "config.json", out / "config.json")
        plain = {k: v.to(dtype) for k, v in state.items()}
        transposed = {k: v.transpose(1, 2).contiguous() if ".mlp.experts." in k else v for k, v in plain.items()}
        save_file(plain, str(out / "plain.safetensors"), metadata={"format": "pt"})
        (out / "plain").mkdir()
        shutil.copyfile(path / "config.json", out / "plain" / "config.json")
        shutil.move(out / "plain.safetensors", out / "plain" / "model.safetensors")
        save_file(transposed, str(out / "model.safetensors"), metadata={"format": "pt"})
        want = load_model(str(out / "plain")).forward_logits(seqs)
        got = load_model(str(out)).forward_logits(seqs)
        for seq, g, w in zip(seqs, got, want):
            assert_logits_close(g, w.astype(np.float64), SAME_TOL, f"transposed {dtype}, length {len(seq)}")


def _broken_copy(source: Path, directory: Path, drop: str | None = None, config_changes: dict | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    directory.mkdir()
    config = json.loads((source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    state = {k: v for k, v in load_file(str(source / "model.safetensors")).items() if k != drop}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("case,match", [
    ("missing_expert", r"model\.layers\.2\.mlp\.experts\.3\.down_proj\.weight' is missing \(exp_down of expert 3 of "
                       r"layer 2\)"),
    ("top_k_above_experts", r"num_experts_per_tok must be a positive integer \(at most 8\), got 9"),
    ("no_experts", r"has no 'num_experts'"),
    ("bad_dense_layer", r"mlp_only_layers must be a list of layer indices from 0 to 2, got \[5\]"),
])  # fmt: skip
def test_broken_moe_checkpoints_raise_clear_errors(models, tmp_path, case, match):
    path, _ = models.get("norm")
    config = json.loads((path / "config.json").read_text())
    experts_key = "num_experts" if "num_experts" in config else "num_local_experts"
    kwargs = {
        "missing_expert": dict(drop="model.layers.2.mlp.experts.3.down_proj.weight"),
        "top_k_above_experts": dict(config_changes={"num_experts_per_tok": 9}),
        "no_experts": dict(config_changes={experts_key: None}),
        "bad_dense_layer": dict(config_changes={"mlp_only_layers": [5]}),
    }[case]
    with pytest.raises(ModelLoadError, match=match):
        load_model(str(_broken_copy(path, tmp_path / case, **kwargs)))


# ---- LoRA: the hand-written reference -----------------------------------------------------------------------------


class MoeLoraReference:
    """The reference model with LoRA: peft on attention and lm_head, hand-written LoRA terms in every MLP.

    Tensors are the engine's (names and shapes: layers.{l}.gate.lora_A [R, D] ..., layers.{l}.exp_gate.lora_A
    [1, R, D], exp_gate.lora_B [E, Fe, R], exp_down.lora_A [E, R, Fe], exp_down.lora_B [1, D, R]); y = W x +
    (32 / R) B (A x) per expert, the size-1 factor broadcast to every expert."""

    def __init__(self, hf_model, rank: int, flags: tuple[bool, bool, bool]):
        import copy

        train_attn, train_mlp, train_unembed = flags
        self.rank, self.scale = rank, rt.LORA_ALPHA / rank
        base = copy.deepcopy(hf_model)
        modules = ([r".*\.self_attn\.(q|k|v|o)_proj"] if train_attn else []) + (["lm_head"] if train_unembed else [])
        if modules:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(r=rank, lora_alpha=rt.LORA_ALPHA, lora_dropout=0.0, bias="none",
                                target_modules="|".join(f"({m})" for m in modules))  # fmt: skip
            self.model = get_peft_model(base, config).eval()
            self.params = rt.named_lora_tensors(self.model)
        else:
            self.model, self.params = base, {}
        self.config = getattr(hf_model.config, "text_config", hf_model.config)  # (a VL model's language model)
        root = (self.model.base_model.model if modules else self.model).model
        decoder = getattr(root, "language_model", root)
        for layer, block in enumerate(decoder.layers):
            if train_mlp:
                self._attach_mlp(layer, block.mlp)

    def _new(self, name: str, shape) -> torch.nn.Parameter:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=torch.float32))
        self.params[name] = p
        return p

    def _attach_mlp(self, layer: int, mlp) -> None:
        R, s = self.rank, self.scale
        D, E = self.config.hidden_size, self.config.num_experts
        if not hasattr(mlp, "experts"):  # a dense layer: LoRA on gate, up, down as nn.Linear's
            F = self.config.intermediate_size
            lora = {p: (self._new(f"layers.{layer}.{p}.lora_A", (R, n_in)), self._new(f"layers.{layer}.{p}.lora_B",
                                                                                   (n_out, R)))
                    for p, n_in, n_out in (("gate", D, F), ("up", D, F), ("down", F, D))}  # fmt: skip

            def dense(x, mlp=mlp, lora=lora):
                def proj(name, linear, v):
                    a, b = lora[name]
                    return linear(v) + s * (v @ a.T) @ b.T

                act = mlp.act_fn(proj("gate", mlp.gate_proj, x)) * proj("up", mlp.up_proj, x)
                return proj("down", mlp.down_proj, act)

            mlp.forward = dense
            return
        Fe = self.config.moe_intermediate_size
        a1, b1 = self._new(f"layers.{layer}.exp_gate.lora_A", (1, R, D)), self._new(
            f"layers.{layer}.exp_gate.lora_B", (E, Fe, R))
        a3, b3 = self._new(f"layers.{layer}.exp_up.lora_A", (1, R, D)), self._new(
            f"layers.{layer}.exp_up.lora_B", (E, Fe, R))
        a2, b2 = self._new(f"layers.{layer}.exp_down.lora_A", (E, R, Fe)), self._new(
            f"layers.{layer}.exp_down.lora_B", (1, D, R))
        experts = mlp.experts

        def forward(hidden, top_k_index, top_k_weights, experts=experts):
            """transformers' eager expert loop, each expert's matrices W_e + s B_e A_e (by their products)."""
            out = torch.zeros_like(hidden)
            for e in range(E):
                token, slot = torch.where(top_k_index == e)
                if token.numel() == 0:
                    continue
                x = hidden[token]
                gate_w, up_w = experts.gate_up_proj[e].chunk(2, dim=0)
                gate = x @ gate_w.T + s * (x @ a1[0].T) @ b1[e].T
                up = x @ up_w.T + s * (x @ a3[0].T) @ b3[e].T
                act = experts.act_fn(gate) * up
                f = act @ experts.down_proj[e].T + s * (act @ a2[e].T) @ b2[0].T
                out.index_add_(0, token, f * top_k_weights[token, slot, None])
            return out

        experts.forward = forward

    def load(self, values: dict[str, np.ndarray]) -> None:
        assert set(values) == set(self.params), (sorted(set(values) ^ set(self.params)))[:6]
        with torch.no_grad():
            for name, p in self.params.items():
                assert tuple(values[name].shape) == tuple(p.shape), (name, values[name].shape, p.shape)
                p.copy_(torch.from_numpy(np.ascontiguousarray(values[name])))

    def gradients(self) -> dict[str, np.ndarray]:
        return {k: (p.grad if p.grad is not None else torch.zeros_like(p)).double().numpy().copy()
                for k, p in self.params.items()}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None


def random_values(shapes: dict, rank: int, seed: int, gain: float = 0.3) -> dict[str, np.ndarray]:
    """A ~ N(0, 1/in), B ~ N(0, (gain sqrt(R) / 32)^2): every gradient non-trivial, the model sane."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        std = 1.0 / np.sqrt(shape[-1]) if name.endswith("lora_A") else gain * np.sqrt(rank) / rt.LORA_ALPHA
        out[name] = (rng.standard_normal(shape) * std).astype(np.float32)
    return out


def make_data(name: str, vocab: int, lengths, seed: int, model):
    """(tokens, loss_fn_inputs) per length, the tokens routed clearly by `model` (the reference with LoRA)."""
    rng = np.random.default_rng(_seed("data", name, lengths, seed))
    data = []
    for n, seq in zip(lengths, _sequences(f"{name}/{seed}", vocab, lengths, model)):
        tokens = seq.tolist()
        inputs = {"target_tokens": rng.integers(0, vocab, size=n),
                  "weights": (rng.uniform(-0.5, 2.0, size=n) * (rng.random(n) > 0.3)).astype(np.float32),
                  "advantages": rng.standard_normal(n).astype(np.float32)}  # fmt: skip
        data.append((tokens, inputs))
    return data


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    out = {}
    for k, w in want.items():
        g = np.asarray(got[k], dtype=np.float64)
        denom = np.linalg.norm(w)
        out[k] = float(np.linalg.norm(g - w) / denom) if denom > 0 else float(np.linalg.norm(g))
    return out


FLAGS = {"all": (True, True, True), "mlp": (False, True, False), "attn": (True, False, False)}
GRAD_CASES = [("norm", 4, "all", "cross_entropy"), ("norm", 8, "mlp", "importance_sampling"),
              ("nonorm", 4, "all", "cross_entropy"), ("nonorm", 2, "attn", "cross_entropy")]  # fmt: skip


@pytest.mark.parametrize("name,rank,flags,loss_fn", GRAD_CASES, ids=["-".join(map(str, c)) for c in GRAD_CASES])
def test_lora_gradients_equal_torch_reference(models, name, rank, flags, loss_fn):
    path, hf = models.get(name)
    adapter = _training.LoraAdapter(models.engine(name), rank=rank, seed=3, train_attn=FLAGS[flags][0],
                                    train_mlp=FLAGS[flags][1], train_unembed=FLAGS[flags][2])  # fmt: skip
    shapes = {k: v.shape for k, v in adapter.parameters().items()}
    ref = MoeLoraReference(hf, rank, FLAGS[flags])
    assert shapes == {k: tuple(p.shape) for k, p in ref.params.items()}, "adapter tensors differ from Tinker's layout"
    values = random_values(shapes, rank, _seed(name, rank, flags))
    adapter.set_parameters(values)
    ref.load(values)
    data = make_data(name, hf.config.vocab_size, (1, 37, 90), _seed(name, rank), ref.model)
    if loss_fn != "cross_entropy":  # sampler logprobs near the learner's
        learner, _ = rt.reference_forward_backward(ref.model, data, "cross_entropy", backward=False)
        rng = np.random.default_rng(_seed("sampler", name, rank))
        for (_, inputs), lp in zip(data, learner):
            inputs["logprobs"] = (lp - rng.normal(0.0, 0.3, lp.shape)).astype(np.float32)

    result = adapter.forward_backward(data, loss_fn=loss_fn)
    ref.zero_grad()
    want_lps, want_loss = rt.reference_forward_backward(ref.model, data, loss_fn)
    for got, want in zip(result.logprobs, want_lps):
        assert np.abs(np.asarray(got, np.float64) - want).max() <= LP_ATOL
    assert abs(result.metrics["loss:sum"] - want_loss) <= 1e-4 * (1 + abs(want_loss))
    errors = relative_errors(adapter.gradients(), ref.gradients())
    bad = {k: e for k, e in errors.items() if not e <= GRAD_RTOL}
    assert not bad, f"{name}, rank {rank}, {flags}: gradients differ (relative): {sorted(bad.items())[:6]}"
    print(f"{name} r{rank} {flags} {loss_fn}: max relative gradient error {max(errors.values()):.2e}")
    if FLAGS[flags][1]:  # the experts' tensors really got gradients
        assert any(k.endswith("exp_down.lora_A") and np.linalg.norm(v) > 0 for k, v in adapter.gradients().items())


def test_mixed_adapter_batch_equals_each_sequence_alone(models):
    """Sequences of different adapters (ranks 8, 4, 16; attention only, experts only) and of none share one
    pass: each expert's rows hold several adapters' tokens, whose LoRA terms must stay their own."""
    from tinker._engine import get_engine

    engine = models.engine("norm")
    adapters = {}
    for i, (name, rank, flags) in enumerate([("full", 8, (True, True, True)), ("attn", 4, (True, False, False)),
                                             ("mlp", 16, (False, True, False))]):
        adapter = _training.LoraAdapter(engine, rank=rank, seed=i, train_attn=flags[0], train_mlp=flags[1],
                                        train_unembed=flags[2])  # fmt: skip
        adapter.set_parameters(random_values({k: v.shape for k, v in adapter.parameters().items()}, rank, 40 + i,
                                             gain=0.5))  # fmt: skip
        adapters[name] = adapter.handle
    names = ["full", None, "mlp", "attn", "full", "mlp", None, "attn"]
    seqs = _sequences("mixed", 320, (7, 3, 12, 2, 30, 5, 4, 1))

    def forward(batch, handles):
        tokens = np.concatenate(batch).astype(np.int32)
        lens = np.array([len(x) for x in batch], dtype=np.int32)
        logits = np.asarray(get_engine().forward(engine.handle, tokens, lens, adapter=handles).result())
        bounds = np.cumsum([0] + [len(x) for x in batch])
        return [logits[bounds[i]:bounds[i + 1]].copy() for i in range(len(batch))]

    mixed = forward(seqs, [adapters[n] if n else None for n in names])
    for seq, name, got in zip(seqs, names, mixed):
        alone = forward([seq], adapters[name] if name else None)[0]
        scale = np.maximum(1.0, np.abs(alone).max(axis=-1, keepdims=True))
        assert (np.abs(got - alone) <= SAME_TOL * scale).all(), f"adapter {name}, length {len(seq)}"
    full_alone = forward([seqs[0]], adapters["mlp"])[0]
    assert np.abs(full_alone - mixed[0]).max() > 1e-3, "the adapters do not differ: the test would prove nothing"


# ---- sampling --------------------------------------------------------------------------------------------------


@torch.no_grad()
def clear_greedy_case(model, name: str, length: int) -> tuple[list[int], list[int]]:
    """(prompt, generate's greedy continuation) such that the whole sequence is routed clearly."""
    for attempt in range(50):
        prompt = _sequences(f"{name}/{attempt}", 320, (length,))[0].tolist()
        want, _ = rs.greedy_generate(model, prompt, GREEDY_TOKENS, None)
        if routing_gap(model, prompt + want) > ROUTING_GAP:
            return prompt, want
    raise AssertionError(f"{name}: no prompt of length {length} with a clearly routed continuation in 50 draws")


def test_greedy_sampling_equals_generate(models):
    path, ref = models.get("norm")
    client = tinker.ServiceClient().create_sampling_client(base_model=str(path))
    for length in (1, 12):
        prompt, want = clear_greedy_case(ref, "greedy", length)
        res = client.sample(prompt=types.ModelInput.from_ints(prompt), num_samples=1,
                            sampling_params=types.SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0)).result()
        assert [int(t) for t in res.sequences[0].tokens] == want, f"prompt of {length}"


def test_greedy_sampling_with_an_adapter_equals_the_reference(models):
    path, hf = models.get("nonorm")
    adapter = _training.LoraAdapter(models.engine("nonorm"), rank=4, seed=5)
    values = random_values({k: v.shape for k, v in adapter.parameters().items()}, 4, 11, gain=0.5)
    adapter.set_parameters(values)
    ref = MoeLoraReference(hf, 4, (True, True, True))
    ref.load(values)
    prompt, want = clear_greedy_case(ref.model, "greedy-lora", 15)
    res = _sampling.sample(models.engine("nonorm"), prompt, num_samples=2, max_tokens=GREEDY_TOKENS,
                           temperature=0.0, adapter=adapter.snapshot())  # fmt: skip
    base = _sampling.sample(models.engine("nonorm"), prompt, max_tokens=GREEDY_TOKENS, temperature=0.0)
    for seq in res.sequences:
        assert [int(t) for t in seq.tokens] == want
    assert [int(t) for t in base.sequences[0].tokens] != want, "the adapter changed nothing"


# ---- checkpoints ------------------------------------------------------------------------------------------------


@pytest.fixture
def store(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TINKER_HOME", str(tmp_path / "store"))
    return tmp_path / "store"


def _datums(seed: int, vocab: int = 320) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (9, 30):
        tokens = rng.integers(0, vocab, size=n).tolist()
        out.append(types.Datum(model_input=types.ModelInput.from_ints(tokens[:-1]),
                               loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (n - 1)}))
    return out


def test_save_and_load_state_round_trip(models, store):
    path, hf = models.get("norm")
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(str(path), rank=4, seed=7)
    for step in range(2):
        tc.forward_backward(_datums(step), "cross_entropy").result()
        tc.optim_step(types.AdamParams(learning_rate=1e-2)).result()
    saved_path = tc.save_state("moe").result().path
    params, state = tc._adapter.parameters(), tc._adapter.optimizer_state()

    run, kind, name = ckpt.parse_path(saved_path)
    directory = ckpt.checkpoint_dir(run, kind, name)
    keys = safetensors_keys(directory / ckpt.ADAPTER_WEIGHTS)
    E, I, H, R = 8, 96, 64, 4
    prefix = "base_model.model.model.layers.0.mlp.experts"
    assert keys[f"{prefix}.w1.lora_A.weight"] == [1, R, H] and keys[f"{prefix}.w1.lora_B.weight"] == [E, I, R]
    assert keys[f"{prefix}.w3.lora_A.weight"] == [1, R, H] and keys[f"{prefix}.w3.lora_B.weight"] == [E, I, R]
    assert keys[f"{prefix}.w2.lora_A.weight"] == [E, R, I] and keys[f"{prefix}.w2.lora_B.weight"] == [1, H, R]
    assert keys["base_model.model.model.layers.1.mlp.gate_proj.lora_A.weight"] == [R, H]  # the dense layer
    assert keys["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] == [128, R]
    assert not any(".mlp.gate." in k for k in keys), "the router is not adapted"
    config = json.loads((directory / ckpt.ADAPTER_CONFIG).read_text())
    assert config["r"] == R and {"w1", "w2", "w3", "q_proj", "lm_head"} <= set(config["target_modules"])

    other = service.create_lora_training_client(str(path), rank=4, seed=99)
    other.load_state_with_optimizer(saved_path).result()
    got, got_state = other._adapter.parameters(), other._adapter.optimizer_state()
    assert set(got) == set(params) and all(np.array_equal(got[k], params[k]) for k in params)
    assert got_state["step"] == state["step"] == 2
    for moment in ("exp_avg", "exp_avg_sq"):
        assert all(np.array_equal(got_state[moment][k], v) for k, v in state[moment].items())
    fresh = service.create_training_client_from_state(saved_path)
    assert all(np.array_equal(fresh._adapter.parameters()[k], params[k]) for k in params)
    a = tc.forward_backward(_datums(5), "cross_entropy").result()
    b = fresh.forward_backward(_datums(5), "cross_entropy").result()
    assert a.metrics["loss:sum"] == b.metrics["loss:sum"]


def test_saved_adapter_leaves_the_store(models, store, tmp_path):
    """The sampler checkpoint samples like the trained adapter; the adapter directory exported from it
    (Tinker's layout) trains on elsewhere; merging into an MoE base is refused with a clear error."""
    from tinker._exceptions import BadRequestError
    from tinker._export import export_adapter, export_merged

    path, hf = models.get("nonorm")
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(str(path), rank=4, seed=3)
    tc.forward_backward(_datums(1), "cross_entropy").result()
    tc.optim_step(types.AdamParams(learning_rate=5e-2)).result()
    sampler_path = tc.save_weights_for_sampler("w").result().path
    prompt = types.ModelInput.from_ints(_sequences("saved", 320, (20,))[0].tolist())
    live = tc.save_weights_and_get_sampling_client().compute_logprobs(prompt).result()
    saved = service.create_sampling_client(model_path=sampler_path).compute_logprobs(prompt).result()
    base = service.create_sampling_client(base_model=str(path)).compute_logprobs(prompt).result()
    assert saved == live and saved != base

    directory = export_adapter(sampler_path, tmp_path / "adapter")
    resumed = service.create_training_client_from_state(str(directory), base_model=str(path))
    params = tc._adapter.parameters()
    assert all(np.array_equal(resumed._adapter.parameters()[k], v) for k, v in params.items())
    with pytest.raises(BadRequestError, match="mixture-of-experts"):
        export_merged(sampler_path, tmp_path / "merged")
