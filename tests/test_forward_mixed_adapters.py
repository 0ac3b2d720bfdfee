"""The batch geometry of the layer recipe: sequences of different adapters in one pass over the base weights, and
embeddings that replace tokens' (how image features enter).

A forward request may give each sequence its own adapter (or none: the base model). LoRA is applied per
adapter segment of the packed batch, so each sequence must get what it gets through its adapter without the
others' adapters: against the same sequences run in a batch of one adapter with the same geometry, and against
each sequence run alone. Equal to float32 rounding (1e-5): not bit for bit, because OpenBLAS sums a product of
a few rows (a short segment, a lone sequence) with other kernels, in another order, than one of many rows. Adapters of different ranks and targets (attention only, MLP only, the unembedding)
share the batch; a check that they really differ from each other keeps the test from passing vacuously.
"""

from __future__ import annotations

import numpy as np
import pytest

import reference_training as rt
import tiny_models as tm
from tinker import _training
from tinker._engine import get_engine, load_model

ADAPTERS = {  # name -> (rank, train_attn, train_mlp, train_unembed)
    "full_r8": (8, True, True, True),
    "attn_r4": (4, True, False, False),
    "mlp_unembed_r16": (16, False, True, True),
}


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def setup(request, tmp_path_factory):
    arch = request.param
    path, ref = tm.make_hf_checkpoint(tmp_path_factory.mktemp(arch) / arch, arch, seed=31)
    model = load_model(str(path))
    table = ref.get_input_embeddings().weight.detach().numpy().astype(np.float32)
    adapters = {}
    for i, (name, (rank, attn, mlp, unembed)) in enumerate(ADAPTERS.items()):
        adapter = _training.LoraAdapter(model, rank=rank, seed=100 + i, train_attn=attn, train_mlp=mlp,
                                        train_unembed=unembed)
        shapes = rt.expected_tensor_shapes(ref.config, rank, train_attn=attn, train_mlp=mlp, train_unembed=unembed)
        adapter.set_parameters(rt.random_adapter_values(shapes, seed=200 + i, gain=0.5))
        adapters[name] = adapter
    return model, adapters, table


def forward(model, seqs, adapters, **embeds):
    """Logits of each sequence; `adapters` is one handle (or None) for all or a list, one per sequence."""
    tokens = np.concatenate(seqs).astype(np.int32)
    lens = np.array([len(s) for s in seqs], dtype=np.int32)
    logits = np.asarray(get_engine().forward(model.handle, tokens, lens, adapter=adapters, **embeds).result())
    bounds = np.cumsum([0] + [len(s) for s in seqs])
    return [logits[bounds[i] : bounds[i + 1]].copy() for i in range(len(seqs))]


def test_mixed_batch_equals_each_sequence_alone(setup):
    model, adapters, _ = setup
    rng = np.random.default_rng(5)
    names = ["full_r8", None, "attn_r4", "full_r8", "mlp_unembed_r16", None, "mlp_unembed_r16", "attn_r4"]
    seqs = [rng.integers(3, model.vocab_size, size=n) for n in (7, 3, 12, 2, 9, 5, 4, 1)]
    handles = [adapters[n].handle if n else None for n in names]
    mixed = forward(model, seqs, handles)
    for i, (name, seq) in enumerate(zip(names, seqs)):
        uniform = forward(model, seqs, handles[i])[i]  # the same geometry, every sequence through this adapter
        np.testing.assert_allclose(mixed[i], uniform, rtol=1e-5, atol=1e-5, err_msg=f"sequence {i} ({name}) uniform")
        [alone] = forward(model, [seq], handles[i])
        np.testing.assert_allclose(mixed[i], alone, rtol=1e-5, atol=1e-5, err_msg=f"sequence {i} ({name}) alone")
    # the adapters matter: each changes its sequence's logits far beyond the tolerance above
    base = forward(model, seqs, None)
    for i, name in enumerate(names):
        if name:
            assert np.max(np.abs(mixed[i] - base[i])) > 1e-2, f"sequence {i}: adapter {name} changed nothing"


def test_adapter_list_must_match_the_sequences(setup):
    model, adapters, _ = setup
    seqs = [np.array([3, 4, 5]), np.array([6, 7])]
    with pytest.raises(ValueError, match="2 sequences"):
        forward(model, seqs, [adapters["full_r8"].handle])
    with pytest.raises(TypeError):
        forward(model, seqs, [adapters["full_r8"].handle, "not an adapter"])


def test_replacement_embeddings_stand_in_for_tokens(setup):
    """Row t with embedding row e of `embeds` computes exactly as if its token's embedding were that row."""
    model, adapters, table = setup
    seqs = [np.array([5, 9, 14, 3, 22]), np.array([7, 8, 30])]
    handle = adapters["full_r8"].handle
    plain = forward(model, seqs, handle)
    # their own embeddings: nothing changes
    rows = np.arange(8, dtype=np.int32)
    own = forward(model, seqs, handle, embeds=table[np.concatenate(seqs)], embed_rows=rows)
    for a, b in zip(own, plain):
        np.testing.assert_array_equal(a, b)
    # tokens 1 and 6 of the batch take the embeddings of tokens 40 and 41: as if those were the tokens
    rows = np.full(8, -1, dtype=np.int32)
    rows[1], rows[6] = 1, 0
    swapped = forward(model, seqs, handle, embeds=table[[41, 40]], embed_rows=rows)
    expected = forward(model, [np.array([5, 40, 14, 3, 22]), np.array([7, 41, 30])], handle)
    for a, b in zip(swapped, expected):
        np.testing.assert_array_equal(a, b)
    assert np.max(np.abs(swapped[0][1:] - plain[0][1:])) > 1e-3  # and it did change something


def test_bad_replacement_embeddings_raise(setup):
    model, _, table = setup
    seqs = [np.array([5, 9, 14])]
    D = table.shape[1]
    with pytest.raises(ValueError, match="embed_rows"):
        forward(model, seqs, None, embeds=np.zeros((1, D), np.float32), embed_rows=np.array([0, 1, -1], np.int32))
    with pytest.raises(ValueError, match="finite"):
        forward(model, seqs, None, embeds=np.full((1, D), np.nan, np.float32), embed_rows=np.array([0, -1, -1], np.int32))
    with pytest.raises(ValueError, match="width"):
        forward(model, seqs, None, embeds=np.zeros(D + 1, np.float32), embed_rows=np.array([0, -1, -1], np.int32))
    with pytest.raises(TypeError):
        forward(model, seqs, None, embeds=np.zeros((1, D), np.float32))
