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
  trains on; export --merge writes a checkpoint transformers loads whose logits equal the engine's through the
  adapter within 1e-4 * max(1, |logit|) (per-expert, fused and GGUF bases);
- the MoE routing metrics: the engine's tokens per expert equal the reference routing's exactly, the metrics
  their definitions within 1e-12.
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
        elif name.startswith("gguf_"):  # with a tokenizer, which the merged export rebuilds
            _, ref = self.get("norm")
            path, ref = tm.write_gguf(self.root / f"{name}.gguf", ref, "qwen3moe", name.split("_", 1)[1],
                                      byte_tokenizer=True)
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


def write_transposed_checkpoint(source: Path, reference, directory: Path, dtype=torch.float32) -> Path:
    """The reference's fused experts stored [E, in, n out] as Qwen3-VL-MoE's files are (gate_up_proj [E, H, 2I], gate
    columns first; down_proj [E, I, H]; used as x @ W[e]), the rest as in the fused checkpoint."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source / "config.json", directory / "config.json")
    state = {k: v.detach().to(dtype).contiguous() for k, v in reference.state_dict().items()}
    for k in [k for k in state if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj"))]:
        state[k] = state[k].transpose(1, 2).contiguous()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_fused_layout_loads(models, tmp_path, dtype):
    """[E, H, 2I] and [E, I, H] (Qwen3-VL-MoE's x @ W[e] orientation) load: each expert's slices are gathered
    column by column. float32: the per-expert checkpoint's logits within 1e-5; bfloat16: the same as a per-expert
    bfloat16 file of the same values, bit for bit; the exporter reads the same weights back."""
    from safetensors.torch import save_file

    from tinker._export import _read_tensor
    from tinker._models import model_spec, resolve_model

    path, ref = models.get("norm")
    transposed = write_transposed_checkpoint(path, ref, tmp_path / "transposed", dtype)
    keys = safetensors_keys(transposed)
    assert keys["model.layers.0.mlp.experts.gate_up_proj"] == [8, 64, 192]
    assert keys["model.layers.0.mlp.experts.down_proj"] == [8, 96, 64]
    if dtype == torch.float32:
        want_path = path
    else:  # the per-expert file of the same bfloat16 values
        want_path = tmp_path / "per_expert"
        want_path.mkdir()
        shutil.copyfile(path / "config.json", want_path / "config.json")
        from safetensors.torch import load_file

        save_file({k: v.to(dtype).contiguous() for k, v in load_file(str(path / "model.safetensors")).items()},
                  str(want_path / "model.safetensors"), metadata={"format": "pt"})
    seqs = _sequences("transposed", 320)
    got = load_model(str(transposed)).forward_logits(seqs)
    want = load_model(str(want_path)).forward_logits(seqs)
    for seq, g, w in zip(seqs, got, want):
        if dtype == torch.float32:
            assert_logits_close(g, w.astype(np.float64), SAME_TOL, f"transposed, length {len(seq)}")
        else:
            np.testing.assert_array_equal(g, w)
    spec, base = model_spec(resolve_model(str(transposed))), model_spec(resolve_model(str(want_path)))
    by_key = {(t[1], t[2], t[9]): t for t in base.tensors}
    experts = [t for t in spec.tensors if t[10]]
    assert len(experts) == 2 * 8 * 3  # two sparse layers, 8 experts, gate / up / down
    for t in experts:
        np.testing.assert_array_equal(_read_tensor(spec, t), _read_tensor(base, by_key[(t[1], t[2], t[9])]))


@pytest.mark.parametrize("change,match", [
    (lambda t: t[:10] + (t[7][0] - 1,), r"column stride 95 is below its 96 rows"),
    (lambda t: t[:5] + (t[5] - 4,) + t[6:], r"stored transposed\) has \d+ bytes, but its shape, column stride 192"),
    (lambda t: t[:6] + (8,) + t[7:], r"only 2-D F32, F16 and BF16"),  # Q8_0
])  # fmt: skip
def test_bad_transposed_sources_are_refused(models, tmp_path, change, match):
    """The engine checks what the Python loader says of a transposed slice (stride, byte span, type)."""
    from tinker._engine import get_engine
    from tinker._models import model_spec, resolve_model

    path, ref = models.get("norm")
    spec = model_spec(resolve_model(str(write_transposed_checkpoint(path, ref, tmp_path / "t"))))
    at = next(i for i, t in enumerate(spec.tensors) if t[10] and t[1] == "exp_gate")
    tensors = list(spec.tensors)
    tensors[at] = change(tensors[at])
    with pytest.raises(ValueError, match=match):
        get_engine().load_model(spec.config, spec.paths, tensors).result()


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


# ---- routing metrics -------------------------------------------------------------------------------------------


@torch.no_grad()
def reference_expert_tokens(model, data) -> np.ndarray:
    """[sparse layers, E]: the (token, expert) assignments each expert gets in the reference's routing (top k of
    the router softmax of each sparse layer), summed over the datums."""
    config = getattr(model, "config", None) or model.base_model.model.config
    total = None
    for tokens, _ in data:
        ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).reshape(1, -1)
        out = model(input_ids=ids, use_cache=False, output_router_logits=True)
        chosen = [torch.topk(torch.softmax(z.float(), -1), config.num_experts_per_tok, dim=-1).indices
                  for z in out.router_logits]  # fmt: skip
        counts = torch.stack([torch.bincount(c.reshape(-1), minlength=config.num_experts) for c in chosen])
        total = counts if total is None else total + counts
    return total.numpy()


def reference_moe_metrics(counts: np.ndarray, k: int, n_tokens: int) -> dict[str, float]:
    """Tinker's MoE metrics (qwen3-moe-vl.md §1.8) by their definitions, in torch float64: per layer, perfect
    balance = T k / E assignments per expert; then mean (max) over sparse layers."""
    c = torch.as_tensor(counts, dtype=torch.float64)
    E = c.shape[1]
    perfect = n_tokens * k / E
    per_layer = {
        "e_frac_with_tokens": (c >= 1).double().sum(1) / E,
        "e_frac_oversubscribed": (c > perfect).double().sum(1) / E,
        "e_max_violation": (c.max(1).values - perfect) / perfect,
        "e_min_violation": (c.min(1).values - perfect) / perfect,
    }
    return {"e_frac_with_tokens:mean": float(per_layer["e_frac_with_tokens"].mean()),
            "e_frac_oversubscribed:mean": float(per_layer["e_frac_oversubscribed"].mean()),
            "e_max_violation:mean": float(per_layer["e_max_violation"].mean()),
            "e_max_violation:max": float(per_layer["e_max_violation"].max()),
            "e_min_violation:mean": float(per_layer["e_min_violation"].mean())}  # fmt: skip


MOE_METRICS = ("e_frac_with_tokens:mean", "e_frac_oversubscribed:mean", "e_max_violation:mean",
               "e_max_violation:max", "e_min_violation:mean")  # fmt: skip


@pytest.mark.parametrize("name,lengths", [("norm", (5, 33, 61, 2)), ("nonorm", (5, 33, 61, 2)), ("norm", (1, 2))])
def test_moe_metrics_equal_the_reference_routing(models, name, lengths):
    """forward_backward and forward report Tinker's MoE metrics, computed from the routing the engine did: the
    counts per expert equal those of the reference's routing (adapter included: LoRA on attention and experts
    moves the routers' inputs) and the metrics equal their definitions on them (float64, 1e-12)."""
    path, hf = models.get(name)
    rank = 4
    adapter = _training.LoraAdapter(models.engine(name), rank=rank, seed=2)
    values = random_values({k: v.shape for k, v in adapter.parameters().items()}, rank, _seed("metrics", name))
    adapter.set_parameters(values)
    ref = MoeLoraReference(hf, rank, (True, True, True))
    ref.load(values)
    data = make_data(name, hf.config.vocab_size, lengths, _seed("metrics-data", name), ref.model)
    counts = reference_expert_tokens(ref.model, data)
    k = hf.config.num_experts_per_tok
    assert counts.shape == (len(models.engine(name).handle.config["moe_layers"]), hf.config.num_experts)
    assert (counts.sum(1) == sum(lengths) * k).all()
    assert (counts.max(1) > counts.min(1)).all(), "a trivially balanced routing"
    if sum(lengths) * k < hf.config.num_experts:
        assert (counts == 0).any(1).all(), "some expert idle in every layer"
    want = reference_moe_metrics(counts, k, sum(lengths))
    for backward in (True, False):
        request = adapter.submit(data, "cross_entropy", backward=backward)
        got_counts = np.asarray(request._request.result()[2])
        np.testing.assert_array_equal(got_counts, counts)
        metrics = request.result().metrics
        assert set(metrics) == {"loss:sum", *MOE_METRICS}
        for key in MOE_METRICS:
            assert abs(metrics[key] - want[key]) <= 1e-12, (key, metrics[key], want[key])
    print(name, want)


def test_moe_metrics_through_the_public_api(models, tmp_path):
    """TrainingClient.forward_backward / forward outputs carry the metrics for an MoE model, not for a dense
    one; a batch that takes several engine groups counts every token once."""
    path, _ = models.get("norm")
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(str(path), rank=2, seed=1)
    fb = tc.forward_backward(_datums(3), "cross_entropy").result()
    fw = tc.forward(_datums(3), "cross_entropy").result()
    assert set(MOE_METRICS) <= set(fb.metrics) and fb.metrics == fw.metrics
    assert 0 < fb.metrics["e_frac_with_tokens:mean"] <= 1 and fb.metrics["e_min_violation:mean"] >= -1
    assert fb.metrics["e_max_violation:max"] >= fb.metrics["e_max_violation:mean"] >= 0
    dense_path, _ = tm.make_hf_checkpoint(tmp_path / "dense", "qwen3", seed=1, vocab=320)
    dense = service.create_lora_training_client(str(dense_path), rank=2, seed=1)
    out = dense.forward_backward(_datums(3), "cross_entropy").result()
    assert set(out.metrics) == {"loss:sum"}

    n = 500
    datum = ((np.arange(n) * 7 % 320).tolist(), {"target_tokens": np.zeros(n, np.int64),
                                                  "weights": np.ones(n, np.float32)})  # fmt: skip
    request = tc._adapter.submit([datum] * 6, "cross_entropy", backward=True)  # 3000 tokens: two engine groups
    counts = np.asarray(request._request.result()[2])
    assert (counts.sum(1) == 6 * n * 2).all()


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
    (Tinker's layout) trains on elsewhere."""
    from tinker._export import export_adapter

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


def write_per_expert_peft(directory: Path, params: dict[str, np.ndarray], rank: int, alpha: float, E: int) -> Path:
    """An adapter directory with one PEFT pair per expert module (mlp.experts.{e}.gate_proj ...), as the cookbook's
    build_lora_adapter writes Tinker's adapters (the shared factor repeated in every expert) and as PEFT saves a
    transformers 4.x model's per-expert nn.Linear's; B scaled for lora_alpha = alpha."""
    from safetensors.numpy import save_file

    proj = {"exp_gate": "gate_proj", "exp_up": "up_proj", "exp_down": "down_proj"}
    other = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "q": "self_attn.q_proj",
             "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj"}  # fmt: skip
    rescale = np.float32((32 / rank) / (alpha / rank))
    out = {}
    for name, value in params.items():
        target, layer, ab = ckpt.split_engine_name(name)
        value = value * rescale if ab == "lora_B" else value
        if target in proj:
            for e in range(E):
                out[f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj[target]}.{ab}.weight"] = \
                    np.ascontiguousarray(value[e if value.shape[0] > 1 else 0])
        elif target == "unembed":
            out[f"base_model.model.lm_head.{ab}.weight"] = value
        else:
            out[f"base_model.model.model.layers.{layer}.{other[target]}.{ab}.weight"] = value
    directory.mkdir(parents=True)
    save_file(out, str(directory / ckpt.ADAPTER_WEIGHTS))
    (directory / ckpt.ADAPTER_CONFIG).write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "base_model_name_or_path": None,
        "target_modules": ["gate_proj", "up_proj", "down_proj", "q_proj", "k_proj", "v_proj", "o_proj", "lm_head"]}))
    return directory


def test_per_expert_peft_adapters_load_in_tinkers_layout(models, store, tmp_path):
    """load_state / create_training_client_from_state of a PEFT directory with per-expert modules (the cookbook's
    build_lora_adapter output): gate/up's A and down's B agree across experts, so they convert to Tinker's layout
    exactly (lora_alpha 32: bit for bit; 16: B rescaled as for any PEFT adapter); an adapter whose shared factor
    differs between experts, and a LoRA on fused expert parameters (peft target_parameters), are refused saying
    why."""
    from tinker._exceptions import BadRequestError
    from safetensors.numpy import load_file, save_file

    path, hf = models.get("norm")
    service = tinker.ServiceClient()
    tc = service.create_lora_training_client(str(path), rank=4, seed=3)
    values = random_values({k: v.shape for k, v in tc._adapter.parameters().items()}, 4, 17, gain=0.5)
    tc._adapter.set_parameters(values)
    for alpha in (32.0, 16.0):
        directory = write_per_expert_peft(tmp_path / f"alpha{alpha:g}", values, 4, alpha, 8)
        other = service.create_lora_training_client(str(path), rank=4, seed=9)
        other.load_state(str(directory)).result()
        got = other._adapter.parameters()
        assert set(got) == set(values)
        for k, v in values.items():
            if alpha == 32.0:
                np.testing.assert_array_equal(got[k], v, err_msg=k)
            else:
                np.testing.assert_allclose(got[k], v, rtol=1e-6, atol=0, err_msg=k)
    resumed = service.create_training_client_from_state(str(tmp_path / "alpha32"), base_model=str(path))
    assert all(np.array_equal(resumed._adapter.parameters()[k], v) for k, v in values.items())

    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "alpha32", broken)
    tensors = load_file(str(broken / ckpt.ADAPTER_WEIGHTS))
    tensors["base_model.model.model.layers.2.mlp.experts.5.down_proj.lora_B.weight"] *= 1.5
    save_file(tensors, str(broken / ckpt.ADAPTER_WEIGHTS))
    with pytest.raises(BadRequestError, match=r"experts' exp_down adapters of layer 2: expert 5's lora_B differs from "
                                              r"expert 0's\. Tinker's expert LoRA shares one factor across the "
                                              r"experts \(B for down_proj\)"):  # fmt: skip
        service.create_lora_training_client(str(path), rank=4).load_state(str(broken)).result()

    fused = tmp_path / "fused_peft"
    fused.mkdir()
    save_file({"base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight": np.zeros((32, 64), np.float32),
               "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight": np.zeros((192, 32), np.float32)},
              str(fused / ckpt.ADAPTER_WEIGHTS))  # fmt: skip
    (fused / ckpt.ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 32,
                                                         "target_parameters": ["mlp.experts.gate_up_proj"]}))
    with pytest.raises(BadRequestError, match=r"LoRA on fused expert parameters \(peft target_parameters"):
        service.create_lora_training_client(str(path), rank=4).load_state(str(fused)).result()


MERGE_TOL = 1e-4  # merged checkpoint in transformers vs the engine with the adapter, relative to max(1, |logit|)


@pytest.mark.parametrize("name", ["nonorm", "fused", "gguf_F32"])
def test_merged_export_equals_the_engine_with_the_adapter(models, store, tmp_path, name):
    """export_merged of an MoE adapter (each expert's delta (32/r) B_e A_e, the shared factor broadcast; attention,
    the dense layers' MLP and lm_head as for dense models) writes a checkpoint that transformers loads and whose
    logits equal the engine's through the adapter. Bases: per-expert safetensors (the adapter read back from its
    exported PEFT directory), fused 3-D safetensors (the adapter as per-expert PEFT modules), a GGUF (its
    config.json written from the engine config)."""
    from transformers import AutoModelForCausalLM

    from tinker._engine import get_engine
    from tinker._export import export_adapter, export_merged

    path, _ = models.get(name)
    tc = tinker.ServiceClient().create_lora_training_client(str(path), rank=4, seed=3)
    adapter = tc._adapter
    adapter.set_parameters(random_values({k: v.shape for k, v in adapter.parameters().items()}, 4,
                                         _seed("merge", name), gain=0.5))  # fmt: skip
    source = tc.save_weights_for_sampler("merge").result().path
    if name == "nonorm":  # the adapter's PEFT directory (Tinker's layout)
        source = str(export_adapter(source, tmp_path / "adapter"))
    elif name == "fused":  # the same adapter as per-expert PEFT modules, lora_alpha 16
        source = str(write_per_expert_peft(tmp_path / "per_expert", adapter.parameters(), 4, 16.0, 8))
    out = export_merged(source, tmp_path / "merged", base_model=str(path))
    keys = safetensors_keys(out)
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in keys), "per-expert names"
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager")
    merged.config._experts_implementation = "eager"
    merged.eval()

    seqs = _sequences(f"merge/{name}", 320, (3, 40, 97), model=merged)
    tokens = np.concatenate(seqs).astype(np.int32)
    lens = np.array([len(x) for x in seqs], dtype=np.int32)
    got = np.asarray(get_engine().forward(adapter.model.handle, tokens, lens, adapter=adapter.handle).result())
    base = np.asarray(get_engine().forward(adapter.model.handle, tokens, lens).result())
    bounds = np.cumsum([0, *lens])
    worst = 0.0
    for i, seq in enumerate(seqs):
        want = tm.reference_logits(merged, seq)
        assert_logits_close(got[bounds[i]:bounds[i + 1]], want, MERGE_TOL, f"{name}, length {len(seq)}")
        assert np.abs(base[bounds[i]:bounds[i + 1]] - want).max() > 1e-2, "the adapter changes nothing"
        worst = max(worst, float((np.abs(got[bounds[i]:bounds[i + 1]] - want) / np.maximum(1, np.abs(want))).max()))
    print(f"{name}: merged checkpoint vs engine, worst |diff| / max(1, |logit|) = {worst:.2e}")
