"""tinker.types (Tinker's public data types) and the exception classes: construction, defaults,
validation, conversions, immutability and pickling."""

from __future__ import annotations

import base64
import dataclasses
import json
import pickle
import subprocess
import sys
import typing
from datetime import datetime, timezone

import numpy as np
import pytest
from pydantic import ValidationError

from tinker import _exceptions as exc
from tinker import types
from tinker.types import (
    AdamParams,
    Checkpoint,
    CheckpointArchiveUrlResponse,
    CheckpointsListResponse,
    Cursor,
    Datum,
    DmelChunk,
    EncodedTextChunk,
    ForwardBackwardInput,
    ForwardBackwardOutput,
    GetInfoResponse,
    GetSamplerResponse,
    GetServerCapabilitiesResponse,
    GetSessionResponse,
    ImageAssetPointerChunk,
    ImageChunk,
    ListSessionsResponse,
    LoadWeightsResponse,
    LoraConfig,
    ModelData,
    ModelInput,
    OptimStepRequest,
    OptimStepResponse,
    ParsedCheckpointTinkerPath,
    RequestErrorCategory,
    SampledSequence,
    SampleRequest,
    SampleResponse,
    SamplingParams,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    SupportedModel,
    TensorData,
    TopkPromptLogprobs,
    TrainingRun,
    TrainingRunsResponse,
    WeightsInfoResponse,
    WhoamiResponse,
)

def _roundtrip(obj):
    return pickle.loads(pickle.dumps(obj))


def _frozen_errors():
    return (ValidationError, dataclasses.FrozenInstanceError, AttributeError, TypeError)


# ---------------------------------------------------------------------------------------------------
# import surface


TOP_LEVEL_TYPES = [
    "AdamParams", "Checkpoint", "CheckpointType", "Datum", "DmelChunk", "EncodedTextChunk", "ForwardBackwardOutput",
    "LoraConfig", "ModelID", "ModelInput", "ModelInputChunk", "OptimStepRequest", "OptimStepResponse",
    "ParsedCheckpointTinkerPath", "SampledSequence", "SampleRequest", "SampleResponse", "SamplingParams",
    "StopReason", "TensorData", "TensorDtype", "TrainingRun",
]  # fmt: skip


@pytest.mark.parametrize("name", TOP_LEVEL_TYPES + ["ImageChunk", "ImageAssetPointerChunk", "LossFnType",
                                                   "AuditLogEntry", "AuditLogResponse"])
def test_every_public_type_is_in_tinker_types(name):
    assert hasattr(types, name)
    assert name in types.__all__


def test_all_names_resolve():
    for name in types.__all__:
        assert getattr(types, name) is not None


def test_tensor_data_module_path():
    from tinker.types.tensor_data import TensorData as TD

    assert TD is TensorData


def test_literals_stay_typing_literals():
    assert typing.get_origin(types.LossFnType) is typing.Literal
    assert typing.get_args(types.LossFnType) == ("cross_entropy", "importance_sampling", "ppo", "cispo", "dro", "gspo",
                                                 "stable_reinforce", "custom")  # the 0.38 list
    assert typing.get_args(types.StopReason) == ("length", "stop")
    assert typing.get_args(types.CheckpointType) == ("training", "sampler", "external")  # "external" since 0.33
    assert typing.get_args(types.TensorDtype) == ("int64", "float32")
    assert types.ModelID is str


def test_model_input_chunk_is_usable_as_annotation():
    # cookbook annotations like list[tinker.ModelInputChunk] are evaluated at import
    annotation = list[types.ModelInputChunk]
    assert annotation is not None


@pytest.mark.parametrize("cls", [Datum, TensorData, ForwardBackwardInput, ForwardBackwardOutput, SampledSequence,
                                 SampleResponse, TopkPromptLogprobs])
def test_dataclass_annotations_resolve(cls):
    # real objects, not strings: they resolve even where tinker rewrites __module__ to "tinker"
    hints = typing.get_type_hints(cls)
    assert set(hints) == {f.name for f in dataclasses.fields(cls)}


def test_dataclasses_work_as_pydantic_fields():
    import pydantic

    class Holder(pydantic.BaseModel):
        datum: Datum
        response: SampleResponse

    d = Datum(model_input=ModelInput.from_ints([1]), loss_fn_inputs={"weights": [1.0]})
    holder = Holder(datum=d, response=SampleResponse(sequences=[]))
    assert holder.datum.loss_fn_inputs["weights"].data == [1.0]


def test_importing_types_does_not_import_torch_or_httpx():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['httpx'] = None\n"
        "import numpy as np\n"
        "from tinker import types\n"
        "td = types.TensorData(data=[1.0, 2.0], dtype='float32')\n"
        "d = types.Datum(model_input=types.ModelInput.from_ints([1, 2]), loss_fn_inputs={'weights': [1.0, 0.0],"
        " 'target_tokens': np.array([2, 3])})\n"
        "assert d.loss_fn_inputs['target_tokens'].dtype == 'int64'\n"
        "try:\n"
        "    td.to_torch()\n"
        "except ImportError as e:\n"
        "    assert 'torch' in str(e)\n"
        "else:\n"
        "    raise SystemExit('to_torch did not raise')\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


# ---------------------------------------------------------------------------------------------------
# bases: frozen, extra forbid / ignore, __str__


def test_strict_types_forbid_unknown_fields():
    for make in (lambda: AdamParams(learning_rate=1e-3, lr=1.0), lambda: LoraConfig(rank=4, alpha=8),
                 lambda: ModelInput(chunks=[], extra=1), lambda: EncodedTextChunk(tokens=[1], foo=2),
                 lambda: OptimStepRequest(adam_params=AdamParams(), model_id="m", bogus=1)):
        with pytest.raises(ValidationError):
            make()


def test_response_types_ignore_unknown_fields():
    params = SamplingParams(max_tokens=5, frequency_penaltyy=1.0, n=3)
    assert params.max_tokens == 5 and not hasattr(params, "n")
    assert OptimStepResponse(metrics={"a": 1.0}, extra="x").metrics == {"a": 1.0}
    assert SaveWeightsResponse(path="tinker://a/weights/b", whatever=1).path == "tinker://a/weights/b"


@pytest.mark.parametrize("obj,field,value", [
    (AdamParams(), "learning_rate", 1.0),
    (LoraConfig(rank=4), "rank", 8),
    (SamplingParams(), "temperature", 0.5),
    (ModelInput.from_ints([1]), "chunks", []),
    (EncodedTextChunk(tokens=[1]), "tokens", [2]),
    (OptimStepResponse(), "metrics", {}),
    (SaveWeightsResponse(path="p"), "path", "q"),
])  # fmt: skip
def test_pydantic_types_are_frozen(obj, field, value):
    with pytest.raises(ValidationError):
        setattr(obj, field, value)


def test_str_is_repr():
    for obj in (AdamParams(), SamplingParams(), ModelInput.from_ints([1, 2]), OptimStepResponse()):
        assert str(obj) == repr(obj)
        assert type(obj).__name__ in str(obj)


# ---------------------------------------------------------------------------------------------------
# SamplingParams


def test_sampling_params_defaults():
    p = SamplingParams()
    assert (p.max_tokens, p.seed, p.stop, p.temperature, p.top_k, p.top_p) == (None, None, None, 1, -1, 1)
    assert (p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (0.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("stop,expected", [
    ([1, 2], [1, 2]),
    (["a"], ["a"]),
    ("x", "x"),
    (("a", "b"), ["a", "b"]),
    (["1", "2"], ["1", "2"]),
    ([], []),
    (np.array([7, 8], dtype=np.int32), [7, 8]),
    ([np.int64(3)], [3]),
    (None, None),
])  # fmt: skip
def test_sampling_params_stop_keeps_its_kind(stop, expected):
    p = SamplingParams(stop=stop)
    assert p.stop == expected
    if isinstance(expected, list):
        assert all(type(a) is type(b) for a, b in zip(p.stop, expected))
    assert SamplingParams.model_validate(p.model_dump()).stop == expected


@pytest.mark.parametrize("stop", [[1, "a"], [1.5], [True], 3, b"x", [None]])
def test_sampling_params_bad_stop(stop):
    with pytest.raises(ValidationError, match="stop"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("kwargs,field", [
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": float("nan")}, "presence_penalty"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
])  # fmt: skip
def test_sampling_params_ranges(kwargs, field):
    with pytest.raises(ValidationError, match=field) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)


def test_sampling_params_accepts_edges():
    p = SamplingParams(temperature=0.0, top_k=0, top_p=1.0, max_tokens=0, min_p=1.0, repetition_penalty=1.3,
                       presence_penalty=-0.5, frequency_penalty=0.5, seed=123)
    assert p.temperature == 0 and p.top_k == 0 and p.max_tokens == 0 and p.seed == 123
    assert SamplingParams(top_k=50, top_p=0.9, temperature=0.7).top_k == 50
    # 0.38 range-checks neither (the engine refuses what it cannot run when sampling)
    assert SamplingParams(temperature=-0.1, top_p=0.0).top_p == 0.0 and SamplingParams(top_p=1.5).top_p == 1.5


def test_sampling_params_pickle_and_dump():
    p = SamplingParams(max_tokens=16, stop=["\n\nUser:"], temperature=0.5, seed=3)
    assert _roundtrip(p) == p
    assert SamplingParams.model_validate_json(p.model_dump_json()) == p


def test_sampling_params_extension_docs():
    assert "extension" in SamplingParams.__doc__ and "ignore" in SamplingParams.__doc__


# ---------------------------------------------------------------------------------------------------
# AdamParams / LoraConfig / requests


def test_adam_params_defaults():
    a = AdamParams()
    assert (a.learning_rate, a.beta1, a.beta2, a.eps, a.weight_decay, a.grad_clip_norm) == (1e-4, 0.9, 0.95, 1e-12,
                                                                                           0.0, 0.0)
    b = AdamParams(learning_rate=2e-5, beta1=0.9, beta2=0.95, eps=1e-8)
    assert b.eps == 1e-8 and b.learning_rate == 2e-5
    assert AdamParams(learning_rate=0.0, beta1=0.0, weight_decay=0.1, grad_clip_norm=1.0).grad_clip_norm == 1.0


@pytest.mark.parametrize("kwargs,field", [
    ({"learning_rate": float("nan")}, "learning_rate"),
    ({"learning_rate": float("inf")}, "learning_rate"),
    ({"beta2": float("nan")}, "beta2"),
])  # fmt: skip
def test_adam_params_validation(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        AdamParams(**kwargs)


def test_adam_params_ranges_are_the_optimizers_to_check():
    # 0.38 has no range checks on AdamParams; optim_step refuses what it cannot run (test_sdk038_clients)
    assert AdamParams(beta2=1.0, eps=0.0, learning_rate=-1e-4).beta2 == 1.0


def test_lora_config():
    c = LoraConfig(rank=32)
    assert (c.rank, c.seed, c.train_unembed, c.train_mlp, c.train_attn) == (32, None, True, True, True)
    assert LoraConfig(rank=8, seed=1, train_mlp=False).train_mlp is False
    with pytest.raises(ValidationError):
        LoraConfig()
    assert LoraConfig(rank=0).rank == 0  # 0.38: unchecked here; creating the adapter refuses it
    assert _roundtrip(c) == c


def test_optim_step_request():
    r = OptimStepRequest(adam_params=AdamParams(learning_rate=1e-3), model_id="s:train:0")
    assert r.seq_id is None and r.type == "optim_step" and r.adam_params.learning_rate == 1e-3
    assert OptimStepRequest.model_validate(r.model_dump()) == r


def test_sample_request():
    r = SampleRequest(prompt=ModelInput.from_ints([1, 2]), sampling_params=SamplingParams(max_tokens=3))
    assert r.num_samples == 1 and r.topk_prompt_logprobs == 0 and r.type == "sample"
    assert r.base_model is None and r.model_path is None and r.prompt_logprobs is None and r.seq_id is None
    assert r.sampling_session_id is None
    assert SampleRequest.model_validate_json(r.model_dump_json()) == r
    with pytest.raises(ValidationError):
        SampleRequest(prompt=ModelInput.empty(), sampling_params=SamplingParams(), num_samples=0)
    with pytest.raises(ValidationError):
        SampleRequest(prompt=ModelInput.empty(), sampling_params=SamplingParams(), topk_prompt_logprobs=-1)


# ---------------------------------------------------------------------------------------------------
# ModelInput and chunks


def test_model_input_from_ints_and_helpers():
    m = ModelInput.from_ints([1, 2, 3])
    assert m.to_ints() == [1, 2, 3]
    assert m.length == 3
    assert len(m.chunks) == 1 and isinstance(m.chunks[0], EncodedTextChunk)
    chunk = m.chunks[0]
    assert chunk.tokens == [1, 2, 3] and chunk.tokens[1:] == [2, 3] and chunk.length == 3
    assert chunk.type == "encoded_text"

    m2 = m.append_int(4)
    assert m2 is not m and m.to_ints() == [1, 2, 3] and m2.to_ints() == [1, 2, 3, 4] and m2.length == 4
    m3 = m2.append(EncodedTextChunk(tokens=[5, 6]))
    assert m3.to_ints() == [1, 2, 3, 4, 5, 6] and m2.length == 4
    assert ModelInput.empty().chunks == [] and ModelInput.empty().length == 0 and ModelInput.empty().to_ints() == []
    assert ModelInput(chunks=[EncodedTextChunk(tokens=[1]), EncodedTextChunk(tokens=[2, 3])]).to_ints() == [1, 2, 3]


@pytest.mark.parametrize("tokens", [
    np.array([5, 6, 7], dtype=np.int64),
    np.array([5, 6, 7], dtype=np.int32),
    np.array([5, 6, 7], dtype=np.uint16),
    [np.int64(5), np.int32(6), 7],
    (5, 6, 7),
    range(5, 8),
])  # fmt: skip
def test_tokens_become_python_ints(tokens):
    m = ModelInput.from_ints(tokens)
    assert m.to_ints() == [5, 6, 7]
    assert all(type(t) is int for t in m.chunks[0].tokens)
    assert isinstance(m.chunks[0].tokens, list)


@pytest.mark.parametrize("tokens", [[1.5], ["a"], [True], "abc", 5, [None], np.array([1.0, 2.0]),
                                    np.array([[1, 2]])])
def test_bad_tokens(tokens):
    with pytest.raises(ValidationError):
        EncodedTextChunk(tokens=tokens)


def test_append_rejects_non_chunks():
    with pytest.raises(TypeError, match="append_int"):
        ModelInput.empty().append(5)


PNG = b"\x89PNG\r\n\x1a\nfake image bytes"


def test_image_chunk_base64():
    encoded = base64.b64encode(PNG).decode()
    from_str = ImageChunk(data=encoded, format="png", expected_tokens=4)
    from_bytes = ImageChunk(data=PNG, format="png", expected_tokens=4)
    assert from_str.data == PNG and from_bytes == from_str
    assert from_str.type == "image" and from_str.length == 4

    dumped = from_str.model_dump()
    assert dumped["data"] == encoded
    assert ImageChunk.model_validate(dumped) == from_str
    assert json.loads(from_str.model_dump_json())["data"] == encoded
    assert ImageChunk.model_validate_json(from_str.model_dump_json()) == from_str
    assert ImageChunk(data="data:image/png;base64," + encoded, format="png").data == PNG
    assert ImageChunk(data=bytearray(PNG), format="jpeg").data == PNG


def test_image_chunk_errors():
    with pytest.raises(ValidationError, match="base64"):
        ImageChunk(data="not base64!!", format="png")
    with pytest.raises(ValidationError):
        ImageChunk(data=PNG, format="gif")
    with pytest.raises(ValidationError):
        ImageChunk(data=PNG, format="png", expected_tokens=-1)
    with pytest.raises(ValueError, match="expected_tokens"):
        ImageChunk(data=PNG, format="png").length
    with pytest.raises(ValueError, match="expected_tokens"):
        ModelInput(chunks=[EncodedTextChunk(tokens=[1]), ImageChunk(data=PNG, format="png")]).length


def test_image_asset_pointer_chunk():
    c = ImageAssetPointerChunk(format="jpeg", location="s3://bucket/img.jpg", expected_tokens=7)
    assert c.type == "image_asset_pointer" and c.length == 7
    with pytest.raises(ValueError, match="expected_tokens"):
        ImageAssetPointerChunk(format="png", location="x").length


def _dmel(dims, marker=False):
    def varint(n):
        out = bytearray()
        while True:
            byte = n & 0x7F
            n >>= 7
            out.append(byte | (0x80 if n else 0))
            if not n:
                return bytes(out)

    header = (b"\xfe" if marker else b"") + bytes([1]) + varint(len(dims)) + b"".join(varint(d) for d in dims)
    return header + b"\x00" * 8


def test_dmel_chunk():
    c = DmelChunk(dmel=_dmel([5, 80]))
    assert c.type == "dmel" and c.length == 5
    assert DmelChunk(dmel=_dmel([300, 80])).length == 300
    assert DmelChunk(dmel=_dmel([12], marker=True)).length == 12
    dumped = c.model_dump()
    assert dumped["dmel"] == base64.b64encode(c.dmel).decode()
    assert DmelChunk.model_validate(dumped) == c
    for bad in (b"", b"\x09\x01\x05", _dmel([]), b"\x01\x02\x85"):
        with pytest.raises(ValueError):
            DmelChunk(dmel=bad).length


def test_model_input_mixed_chunks():
    image = ImageChunk(data=PNG, format="png", expected_tokens=3)
    m = ModelInput(chunks=[EncodedTextChunk(tokens=[1, 2]), image, EncodedTextChunk(tokens=[3])])
    assert m.length == 6
    with pytest.raises(ValueError, match="ImageChunk"):
        m.to_ints()
    assert m.append_int(9).length == 7


def test_model_input_dump_validate_round_trip():
    m = ModelInput(chunks=[
        EncodedTextChunk(tokens=[1, 2]),
        ImageChunk(data=PNG, format="png", expected_tokens=3),
        ImageAssetPointerChunk(format="jpeg", location="loc", expected_tokens=2),
        DmelChunk(dmel=_dmel([4, 2])),
    ])  # fmt: skip
    dumped = m.model_dump()
    assert [c["type"] for c in dumped["chunks"]] == ["encoded_text", "image", "image_asset_pointer", "dmel"]
    assert ModelInput.model_validate(dumped) == m
    assert ModelInput.model_validate_json(m.model_dump_json()) == m
    assert ModelInput.model_validate_json(m.model_dump_json()).length == 2 + 3 + 2 + 4
    assert _roundtrip(m) == m and _roundtrip(m).chunks[1].data == PNG


def test_model_input_from_dicts():
    m = ModelInput.model_validate({"chunks": [{"type": "encoded_text", "tokens": [1, 2]}, {"tokens": [3]}]})
    assert m.to_ints() == [1, 2, 3]
    with pytest.raises(ValidationError):
        ModelInput.model_validate({"chunks": [{"type": "video", "data": "x"}]})


def test_chunk_equality():
    assert EncodedTextChunk(tokens=[1, 2]) == EncodedTextChunk(tokens=[1, 2])
    assert EncodedTextChunk(tokens=[1, 2]) != EncodedTextChunk(tokens=[1, 3])
    assert ImageChunk(data=PNG, format="png") != ImageChunk(data=PNG + b"x", format="png")
    assert ModelInput.from_ints([1]) == ModelInput.from_ints([1])


# ---------------------------------------------------------------------------------------------------
# TensorData


def test_tensor_data_from_list():
    td = TensorData(data=[1.0, 2.0, 3.0], dtype="float32", shape=[3])
    assert td.data == [1.0, 2.0, 3.0] and td.dtype == "float32" and td.shape == [3]
    assert td.to_numpy().dtype == np.float32 and td.to_numpy().shape == (3,)
    assert td.tolist() == [1.0, 2.0, 3.0]
    flat = TensorData(data=[1, 2, 3], dtype="int64")
    assert flat.shape is None and flat.to_numpy().dtype == np.int64 and flat.to_numpy().shape == (3,)
    assert all(type(v) is int for v in flat.data)
    positional = TensorData([2.0, 3.0], "float32", [2])
    assert positional.data == [2.0, 3.0] and positional.shape == [2]


def test_tensor_data_shapes():
    td = TensorData(data=[1, 2, 3, 4, 5, 6], dtype="int64", shape=[2, 3])
    assert td.to_numpy().shape == (2, 3) and td.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert td.data == [1, 2, 3, 4, 5, 6]
    nested = TensorData(data=[[1.0, 2.0], [3.0, 4.0]], dtype="float32")
    assert nested.shape == [2, 2] and nested.data == [1.0, 2.0, 3.0, 4.0] and nested.tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="shape"):
        TensorData(data=[1, 2, 3], dtype="int64", shape=[2, 2])
    with pytest.raises(ValueError, match="shape"):
        TensorData(data=[1, 2, 3], dtype="int64", shape=[4])
    with pytest.raises(ValueError):
        TensorData(data=[1, 2], dtype="int64", shape=[-1, -2])
    empty = TensorData(data=[], dtype="float32", shape=[0])
    assert empty.data == [] and empty.to_numpy().shape == (0,)
    assert TensorData(data=[], dtype="int64", shape=[0, 4]).to_numpy().shape == (0, 4)


def test_tensor_data_errors():
    with pytest.raises(TypeError, match="dtype"):
        TensorData(data=[1, 2])
    assert TensorData(dtype="int64").to_numpy().shape == (0,)  # 0.38: no data is an empty tensor
    for bad in ("int32", "float64", "bfloat16", "", "INT64"):
        with pytest.raises(ValueError, match="dtype"):
            TensorData(data=[1], dtype=bad)
    with pytest.raises(ValueError):
        TensorData(data=[[1, 2], [3]], dtype="int64")
    with pytest.raises(ValueError):
        TensorData(data=["a", "b"], dtype="float32")
    with pytest.raises(ValueError):
        TensorData(data=[1, None], dtype="float32")
    assert TensorData(data=[1.5, -2.7], dtype="int64").data == [1, -2]  # 0.38 truncates, as astype
    with pytest.raises(ValueError, match="NaN"):
        TensorData(data=[1.0, float("nan")], dtype="int64")
    with pytest.raises(ValueError):
        TensorData(data=[2**70], dtype="int64")
    assert TensorData(data=[1.0, 2.0], dtype="int64").data == [1, 2]


@pytest.mark.parametrize("np_dtype,dtype", [
    (np.int32, "int64"), (np.int64, "int64"), (np.int8, "int64"), (np.int16, "int64"),
    (np.float64, "float32"), (np.float32, "float32"), (np.float16, "float32"),
])  # fmt: skip
def test_from_numpy_dtypes(np_dtype, dtype):
    arr = np.arange(6).reshape(2, 3).astype(np_dtype)
    td = TensorData.from_numpy(arr)
    assert td.dtype == dtype and td.shape == [2, 3]
    out = td.to_numpy()
    assert out.dtype == np.dtype(dtype) and out.shape == (2, 3)
    np.testing.assert_array_equal(out, arr.astype(dtype))
    assert td.tolist() == arr.astype(dtype).tolist()


@pytest.mark.parametrize("np_dtype", [np.uint8, np.uint32, np.uint64, np.bool_, np.complex64])
def test_from_numpy_rejects_unsigned_bool_complex(np_dtype):
    with pytest.raises(ValueError, match="from_numpy"):
        TensorData.from_numpy(np.zeros(3, dtype=np_dtype))


def test_from_numpy_details():
    assert TensorData.from_numpy(np.arange(3)).shape == [3]
    scalar = TensorData.from_numpy(np.float32(2.5))
    assert scalar.shape == [] and scalar.data == [2.5] and scalar.to_numpy().shape == ()
    with pytest.raises(TypeError):
        TensorData.from_numpy([1, 2, 3])
    # 0.38: the source array is shared (no copy), so changing it later changes the TensorData
    source = np.array([1.0, 2.0], dtype=np.float32)
    td = TensorData.from_numpy(source)
    source[0] = 99.0
    assert td.data == [99.0, 2.0]
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert TensorData.from_numpy(fortran).tolist() == fortran.tolist()
    assert TensorData.from_numpy(np.arange(10, dtype=np.int64)[::2]).data == [0, 2, 4, 6, 8]


def test_to_numpy_is_writable_and_stable():
    td = TensorData(data=[1.0, 2.0], dtype="float32")
    arr = td.to_numpy()
    assert td.to_numpy() is arr  # no copy per call
    copied = arr.copy()
    copied[0] = 5.0
    assert td.data == [1.0, 2.0]
    np.testing.assert_array_equal(np.asarray(td), [1.0, 2.0])
    assert np.asarray(td, dtype=np.float64).dtype == np.float64


def test_tensor_data_torch():
    torch = pytest.importorskip("torch")
    cases = [
        (torch.tensor([1.5, 2.5], dtype=torch.float32), "float32"),
        (torch.tensor([1.5, 2.5], dtype=torch.float64), "float32"),
        (torch.tensor([1.5, 2.5], dtype=torch.bfloat16), "float32"),
        (torch.tensor([1.5, 2.5], dtype=torch.float16), "float32"),
        (torch.tensor([1, 2], dtype=torch.int32), "int64"),
        (torch.tensor([1, 2], dtype=torch.int64), "int64"),
        (torch.tensor([1, 2], dtype=torch.uint8), "int64"),
        (torch.tensor([True, False]), "int64"),
    ]
    for tensor, dtype in cases:
        td = TensorData.from_torch(tensor)
        assert td.dtype == dtype and td.shape == [2]
        back = td.to_torch()
        assert back.dtype == (torch.float32 if dtype == "float32" else torch.int64)
        assert torch.equal(back, tensor.to(back.dtype))
    matrix = torch.arange(6, dtype=torch.float32).reshape(2, 3).requires_grad_()
    td = TensorData.from_torch(matrix)
    assert td.shape == [2, 3] and td.to_torch().shape == (2, 3)
    assert td.tolist() == [[0, 1, 2], [3, 4, 5]]
    # to_torch gives a fresh, writable tensor
    t = td.to_torch()
    t += 1
    assert td.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert TensorData(data=[1.0], dtype="float32").to_torch().dtype == torch.float32
    with pytest.raises(TypeError):
        TensorData.from_torch(np.zeros(2))
    with pytest.raises(ValueError):
        TensorData.from_torch(torch.zeros(2, dtype=torch.complex64))
    # a torch tensor is also accepted as constructor data
    assert TensorData(data=torch.tensor([1, 2]), dtype="float32").data == [1.0, 2.0]


def test_to_torch_without_torch(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="torch"):
        TensorData(data=[1.0], dtype="float32").to_torch()


def test_tensor_data_sparse():
    td = TensorData(data=[22, 23], dtype="int64", shape=[2, 2], sparse_crow_indices=[0, 1, 2],
                    sparse_col_indices=[1, 0])
    assert td.tolist() == [[0, 22], [23, 0]]
    assert td.data == [22, 23] and td.sparse_crow_indices == [0, 1, 2] and td.sparse_col_indices == [1, 0]
    assert _roundtrip(td).tolist() == [[0, 22], [23, 0]]
    with pytest.raises(ValueError):
        TensorData(data=[1.0], dtype="float32", shape=[2, 2], sparse_crow_indices=[0, 1, 1])
    with pytest.raises(ValueError):
        TensorData(data=[1.0], dtype="float32", shape=[4], sparse_crow_indices=[0, 1], sparse_col_indices=[2])
    with pytest.raises(ValueError):
        TensorData(data=[1.0], dtype="float32", shape=[2, 2], sparse_crow_indices=[0, 1, 2], sparse_col_indices=[0])
    with pytest.raises(ValueError):
        TensorData(data=[1.0], dtype="float32", shape=[2, 2], sparse_crow_indices=[0, 1, 1], sparse_col_indices=[5])


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support:UserWarning")
def test_from_torch_sparse():
    torch = pytest.importorskip("torch")
    dense = torch.tensor([[0.0, 1.5, 0.0], [2.0, 0.0, 3.0]])
    for source in (dense, dense.to_sparse(), dense.to_sparse_csr()):
        td = TensorData.from_torch_sparse(source) if source.layout == torch.strided else TensorData.from_torch(source)
        assert td.sparse_crow_indices == [0, 1, 3] and td.data == [1.5, 2.0, 3.0]
        assert torch.equal(td.to_torch(), dense)


def test_tensor_data_identity_equality_frozen_pickle():
    a = TensorData(data=[1, 2], dtype="int64")
    b = TensorData(data=[1, 2], dtype="int64")
    assert a == a and a != b
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dtype = "float32"
    for td in (a, TensorData(data=[[1.0, 2.0]], dtype="float32"), TensorData(data=[0.5], dtype="float32", shape=[1])):
        back = _roundtrip(td)
        assert back.data == td.data and back.dtype == td.dtype and back.shape == td.shape
        assert back.to_numpy().flags.writeable  # 0.38: to_numpy() is writable
    assert "TensorData(" in repr(a) and "int64" in repr(a)
    assert "1000 values" in repr(TensorData(data=list(range(1000)), dtype="int64"))


# ---------------------------------------------------------------------------------------------------
# Datum


def _mi(n=3):
    return ModelInput.from_ints(list(range(n)))


def test_datum_lists_use_the_key_map():
    d = Datum(model_input=_mi(), loss_fn_inputs={
        "target_tokens": [1, 2, 3], "weights": [1, 0, 1], "advantages": [0.5, 0.5, 0.5], "logprobs": [-1, -2, -3],
        "clip_low_threshold": [0.8] * 3, "clip_high_threshold": (1.2, 1.2, 1.2),
    })  # fmt: skip
    inputs = d.loss_fn_inputs
    assert inputs["target_tokens"].dtype == "int64" and inputs["target_tokens"].data == [1, 2, 3]
    for key in ("weights", "advantages", "logprobs", "clip_low_threshold", "clip_high_threshold"):
        assert inputs[key].dtype == "float32" and inputs[key].shape == [3]
    assert inputs["weights"].data == [1.0, 0.0, 1.0]


def test_datum_nested_lists():
    d = Datum(model_input=_mi(2), loss_fn_inputs={"target_tokens": [[1, 2], [3, 4]], "weights": [[0.5, 0.5], [1, 0]]})
    assert d.loss_fn_inputs["target_tokens"].shape == [2, 2]
    assert d.loss_fn_inputs["weights"].to_numpy().shape == (2, 2)
    with pytest.raises(ValueError, match="weights"):
        Datum(model_input=_mi(2), loss_fn_inputs={"weights": [[1.0, 2.0], [3.0]]})
    # 0.38 converts float lists to the key's int64 by truncation, as numpy's astype
    assert Datum(model_input=_mi(2), loss_fn_inputs={"target_tokens": [1.5, 2.0]}).loss_fn_inputs[
        "target_tokens"].data == [1, 2]


def test_datum_unknown_key_with_list():
    with pytest.raises(KeyError) as info:
        Datum(model_input=_mi(), loss_fn_inputs={"mask": [1, 1, 0]})
    message = str(info.value)
    assert "mask" in message and "target_tokens" in message and "advantages" in message


def test_datum_arrays_and_tensor_data():
    td = TensorData(data=[1.0, 1.0, 1.0], dtype="float32")
    d = Datum(model_input=_mi(), loss_fn_inputs={
        "target_tokens": np.array([1, 2, 3], dtype=np.int32), "weights": td, "mask": np.ones(3),
    })  # fmt: skip
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert d.loss_fn_inputs["weights"] is td
    assert d.loss_fn_inputs["mask"].dtype == "float32"  # arrays of unknown keys are fine
    with pytest.raises(ValueError):
        Datum(model_input=_mi(), loss_fn_inputs={"weights": np.ones(3, dtype=np.uint8)})


def test_datum_torch_inputs():
    torch = pytest.importorskip("torch")
    d = Datum(model_input=_mi(), loss_fn_inputs={"target_tokens": torch.tensor([1, 2, 3]),
                                                 "advantages": torch.tensor([0.1, 0.2, 0.3], dtype=torch.bfloat16)})
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert d.loss_fn_inputs["advantages"].dtype == "float32"
    assert d.loss_fn_inputs["advantages"].to_torch().dtype == torch.float32


@pytest.mark.parametrize("value", [3, 2.5, "abc", None, {"data": [1]}, object()])
def test_datum_other_values_are_type_errors(value):
    with pytest.raises(TypeError, match="weights"):
        Datum(model_input=_mi(), loss_fn_inputs={"weights": value})


def test_datum_model_input_type():
    for bad in ([1, 2, 3], {"chunks": []}, None, "abc"):
        with pytest.raises(TypeError, match="ModelInput"):
            Datum(model_input=bad, loss_fn_inputs={})
    with pytest.raises(TypeError):
        Datum(model_input=_mi(), loss_fn_inputs=[("weights", [1.0])])


def test_datum_is_frozen_but_inputs_stay_mutable():
    d = Datum(model_input=_mi())
    assert d.loss_fn_inputs == {}
    assert Datum(model_input=_mi()).loss_fn_inputs is not d.loss_fn_inputs  # no shared default
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.model_input = _mi(1)
    source = {"advantages": [0.0, 0.0, 0.0]}
    d = Datum(model_input=_mi(), loss_fn_inputs=source)
    assert type(d.loss_fn_inputs) is dict
    d.loss_fn_inputs["advantages"] = TensorData.from_numpy(np.array([1.0, 2.0, 3.0]))
    assert d.loss_fn_inputs["advantages"].data == [1.0, 2.0, 3.0]
    assert source == {"advantages": [0.0, 0.0, 0.0]}  # the caller's dict is not modified


def test_datum_pickle():
    d = Datum(model_input=_mi(), loss_fn_inputs={"target_tokens": [1, 2, 3], "weights": [[1.0, 0.0]] * 3})
    back = _roundtrip(d)
    assert back.model_input == d.model_input
    assert back.loss_fn_inputs.keys() == d.loss_fn_inputs.keys()
    assert back.loss_fn_inputs["weights"].tolist() == [[1.0, 0.0]] * 3
    assert back.loss_fn_inputs["target_tokens"].dtype == "int64"


# ---------------------------------------------------------------------------------------------------
# forward/backward input and output


def test_forward_backward_output():
    logprobs = TensorData(data=[-1.0, -2.0], dtype="float32", shape=[2])
    out = ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[{"logprobs": logprobs}])
    assert out.metrics == {} and out.loss_fn_outputs[0]["logprobs"] is logprobs
    assert not hasattr(out, "loss")
    out.metrics["custom:sum"] = 1.0  # mutable metrics
    assert out.metrics == {"custom:sum": 1.0}
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.metrics = {}
    assert ForwardBackwardOutput("ArrayRecord", [], {"loss:sum": 2.0}).metrics["loss:sum"] == 2.0
    assert _roundtrip(out).loss_fn_outputs[0]["logprobs"].data == [-1.0, -2.0]


def test_forward_backward_input():
    d = Datum(model_input=_mi(), loss_fn_inputs={"target_tokens": [1, 2, 3]})
    fbi = ForwardBackwardInput(data=[d], loss_fn="cross_entropy")
    assert fbi.loss_fn_config is None and fbi.data[0] is d
    assert ForwardBackwardInput([d], "ppo", {"clip_low_threshold": 0.8}).loss_fn_config == {"clip_low_threshold": 0.8}


# ---------------------------------------------------------------------------------------------------
# sampling responses


def test_sampled_sequence():
    s = SampledSequence(stop_reason="stop", tokens=[5, 6, 7], logprobs=[-0.1, -0.2, -0.3])
    assert s.tokens == [5, 6, 7] and s.logprobs == [-0.1, -0.2, -0.3]
    assert s.tokens_np.dtype == np.int32 and s.tokens_np.tolist() == [5, 6, 7]
    assert s.logprobs_np.dtype == np.float32 and s.logprobs_np.shape == (3,)
    assert SampledSequence(stop_reason="length", tokens=[1]).logprobs is None
    assert SampledSequence(stop_reason="length", tokens=[1]).logprobs_np is None
    from_np = SampledSequence(stop_reason="length", tokens=np.array([1, 2], dtype=np.int32),
                              logprobs=np.array([-1.0, -2.0], dtype=np.float32))
    assert from_np.tokens == [1, 2] and type(from_np.tokens[0]) is int and type(from_np.logprobs[0]) is float
    with pytest.raises(ValueError, match="stop_reason"):
        SampledSequence(stop_reason="eos", tokens=[1])
    with pytest.raises(ValueError, match="logprobs"):
        SampledSequence(stop_reason="stop", tokens=[1, 2], logprobs=[-1.0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.tokens = []
    assert _roundtrip(s) == s


def test_sample_response_basic():
    seqs = [SampledSequence(stop_reason="stop", tokens=[1], logprobs=[-0.5])]
    r = SampleResponse(sequences=seqs)
    assert r.prompt_logprobs is None and r.topk_prompt_logprobs is None and r.prompt_cache_hit_tokens == 0
    assert r.prompt_logprobs_np is None and r.topk_prompt_logprobs_np is None
    assert r.sequences[0].tokens == [1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.sequences = []
    with pytest.raises(TypeError):
        SampleResponse(sequences=[[1, 2]])
    assert SampleResponse(sequences=[{"stop_reason": "length", "tokens": [3]}]).sequences[0].tokens == [3]


def test_sample_response_prompt_logprobs():
    topk = [None, [(5, -0.1), (7, -2.0)], [[9, -0.3]]]
    r = SampleResponse(
        sequences=[SampledSequence(stop_reason="length", tokens=[1, 2], logprobs=[-1.0, -1.5])],
        prompt_logprobs=[None, -0.25, -1.5],
        topk_prompt_logprobs=topk,
        prompt_cache_hit_tokens=2,
    )
    assert r.prompt_logprobs == [None, -0.25, -1.5]
    assert r.topk_prompt_logprobs == [None, [(5, -0.1), (7, -2.0)], [(9, -0.3)]]
    assert isinstance(r.topk_prompt_logprobs[2][0], tuple)
    lp = r.prompt_logprobs_np
    assert lp.dtype == np.float32 and lp.shape == (3,) and np.isnan(lp[0]) and lp[1] == -0.25
    arrays = r.topk_prompt_logprobs_np
    assert isinstance(arrays, TopkPromptLogprobs)
    assert arrays.token_ids.dtype == np.int32 and arrays.token_ids.shape == (3, 2)
    assert arrays.logprobs.dtype == np.float32 and arrays.logprobs.shape == (3, 2)
    assert arrays.token_ids.tolist() == [[0, 0], [5, 7], [9, 0]]
    np.testing.assert_allclose(arrays.logprobs, [[-99999.0, -99999.0], [-0.1, -2.0], [-0.3, -99999.0]])
    assert SampleResponse(sequences=[], topk_prompt_logprobs=[None]).topk_prompt_logprobs_np.token_ids.shape == (1, 0)
    from_np = SampleResponse(sequences=[], prompt_logprobs=np.array([np.nan, -1.0], dtype=np.float32))
    assert from_np.prompt_logprobs == [None, -1.0]
    back = _roundtrip(r)
    assert back == r and back.topk_prompt_logprobs_np.token_ids.tolist() == arrays.token_ids.tolist()


# ---------------------------------------------------------------------------------------------------
# training / info responses


def test_training_responses():
    assert OptimStepResponse().metrics is None
    assert OptimStepResponse(metrics={"grad_norm:mean": 1.5}).metrics == {"grad_norm:mean": 1.5}
    s = SaveWeightsResponse(path="tinker://r/weights/a")
    assert s.type is None  # 0.38: the response types no longer preset `type`
    assert SaveWeightsResponse(path="p", type="save_weights").type == "save_weights"
    assert SaveWeightsForSamplerResponse(path="tinker://r/sampler_weights/a").type is None
    lw = LoadWeightsResponse()
    assert lw.path is None and lw.model_id is None and lw.type == "load_weights"
    with pytest.raises(ValidationError):
        SaveWeightsResponse()
    with pytest.raises(ValidationError):
        SaveWeightsResponse(path="p", type="other")
    assert _roundtrip(s) == s


def test_info_responses():
    info = GetInfoResponse(model_data=ModelData(model_name="m", tokenizer_id="t"), model_id="s:train:0",
                           is_lora=True, lora_rank=8)
    assert info.type is None and info.model_data.arch is None and info.model_data.tokenizer_id == "t"
    assert info.model_name is None and info.lora_rank == 8
    assert ModelData().model_name is None
    assert GetInfoResponse.model_validate(info.model_dump()) == info
    caps = GetServerCapabilitiesResponse(supported_models=[SupportedModel(model_name="m", max_context_length=2048)])
    assert caps.supported_models[0].max_context_length == 2048
    assert SupportedModel().model_name is None and SupportedModel().max_context_length is None
    # the SDK's fields, then this server's additions (None unless filled in)
    assert list(SupportedModel.model_fields) == ["model_name", "max_context_length", "trainable", "sampleable",
                                                 "supports_images", "is_moe"]
    assert SupportedModel(model_name="m").is_moe is None and SupportedModel().supports_images is None


def test_request_error_category():
    assert [c.value for c in RequestErrorCategory] == ["unknown", "server", "user"]
    assert RequestErrorCategory.User == "user" and isinstance(RequestErrorCategory.Server, str)


# ---------------------------------------------------------------------------------------------------
# checkpoints and REST types


@pytest.mark.parametrize("path,run,kind,checkpoint_id", [
    ("tinker://abc:train:0/weights/0010", "abc:train:0", "training", "weights/0010"),
    ("tinker://run-1/sampler_weights/final", "run-1", "sampler", "sampler_weights/final"),
    ("tinker://u-u-i-d:train:3/weights/name.with.dots", "u-u-i-d:train:3", "training", "weights/name.with.dots"),
])  # fmt: skip
def test_parse_tinker_path(path, run, kind, checkpoint_id):
    p = ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert (p.tinker_path, p.training_run_id, p.checkpoint_type, p.checkpoint_id) == (path, run, kind, checkpoint_id)


@pytest.mark.parametrize("path", [
    "run/weights/x",
    "http://run/weights/x",
    "tinker:/run/weights/x",
    "tinker://run/weights",
    "tinker://run/weights/x/y",
    "tinker://run/weights/x/",
    "tinker://run/checkpoints/x",
    "tinker://run/sampler/x",
    "tinker:///weights/x",
    "tinker://run/weights/",
    "tinker://../weights/x",
    "tinker://./weights/x",
    "tinker://run/weights/..",
    "tinker://run/weights/.",
    "tinker://run/weights/a\0b",
    "tinker://r\0n/weights/x",
    "tinker://",
    "",
])  # fmt: skip
def test_parse_tinker_path_rejects(path):
    with pytest.raises(ValueError, match="tinker"):
        ParsedCheckpointTinkerPath.from_tinker_path(path)


def test_parse_tinker_path_non_string():
    with pytest.raises(ValueError):
        ParsedCheckpointTinkerPath.from_tinker_path(None)


def test_checkpoint_and_training_run():
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    c = Checkpoint(checkpoint_id="weights/0001", checkpoint_type="training", time=now,
                   tinker_path="tinker://r/weights/0001")
    assert c.size_bytes is None and c.public is False and c.expires_at is None
    with pytest.raises(ValidationError):
        Checkpoint(checkpoint_id="x", checkpoint_type="optimizer", time=now, tinker_path="p")
    parsed = Checkpoint(checkpoint_id="sampler_weights/a", checkpoint_type="sampler", time="2025-01-02T03:04:05Z",
                        tinker_path="p", size_bytes=10, public=True, expires_at="2026-01-01T00:00:00Z")
    assert parsed.time == now and parsed.expires_at.year == 2026
    run = TrainingRun(training_run_id="r", base_model="m", model_owner="me", is_lora=True, lora_rank=8,
                      last_request_time=now, last_checkpoint=c, user_metadata={"renderer_name": "role_colon"})
    assert run.corrupted is False and run.last_sampler_checkpoint is None
    assert run.user_metadata.get("renderer_name") == "role_colon"
    minimal = TrainingRun(training_run_id="r", base_model="m", model_owner="me", is_lora=True, last_request_time=now)
    assert minimal.lora_rank is None and minimal.user_metadata is None and minimal.last_checkpoint is None
    assert TrainingRun.model_validate_json(run.model_dump_json()) == run
    assert _roundtrip(run) == run
    with pytest.raises(ValidationError):
        c.public = True


def test_rest_responses():
    now = datetime.now(timezone.utc)
    cursor = Cursor(offset=0, limit=20, total_count=1)
    run = TrainingRun(training_run_id="r", base_model="m", model_owner="o", is_lora=True, last_request_time=now)
    assert TrainingRunsResponse(training_runs=[run], cursor=cursor).cursor.total_count == 1
    assert CheckpointsListResponse(checkpoints=[]).cursor is None
    url = CheckpointArchiveUrlResponse(url="file:///tmp/x.tar", expires=now)
    assert url.expires == now and not hasattr(url, "expires_at")
    w = WeightsInfoResponse(base_model="m", is_lora=True)
    assert (w.lora_rank, w.train_unembed, w.train_mlp, w.train_attn) == (None, None, None, None)
    assert GetSessionResponse(training_run_ids=["a"], sampler_ids=[]).training_run_ids == ["a"]
    assert ListSessionsResponse(sessions=["s"]).sessions == ["s"]
    assert GetSamplerResponse(sampler_id="s:sample:0", base_model="m").model_path is None
    assert WhoamiResponse(user_urn="urn:local").email is None
    log = types.AuditLogResponse(entries=[types.AuditLogEntry(timestamp=now, event="checkpoint_saved")])
    assert log.entries[0].model_id is None


# ---------------------------------------------------------------------------------------------------
# exceptions


def _make_exception(cls):
    if issubclass(cls, exc.APITimeoutError):
        return cls()
    if issubclass(cls, exc.APIConnectionError):
        return cls(message="no route")
    if issubclass(cls, exc.APIResponseValidationError):
        return cls(None, {"bad": 1}, message="bad schema")
    if issubclass(cls, exc.APIStatusError):
        return cls("status problem", body={"detail": "x"})
    if issubclass(cls, exc.APIError):
        return cls("api problem", None, body={"detail": "y"})
    if issubclass(cls, exc.RequestFailedError):
        return cls("failed", "req-1", RequestErrorCategory.User)
    return cls("something went wrong")


EXCEPTIONS = [getattr(exc, name) for name in exc.__all__]


@pytest.mark.parametrize("cls", EXCEPTIONS, ids=lambda c: c.__name__)
def test_exceptions_pickle(cls):
    err = _make_exception(cls)
    back = _roundtrip(err)
    assert type(back) is cls
    assert str(back) == str(err) and back.args == err.args
    assert back.__dict__ == err.__dict__
    assert isinstance(back, exc.TinkerError)


def test_exception_hierarchy():
    assert issubclass(exc.APIError, exc.TinkerError) and issubclass(exc.TinkerError, Exception)
    for cls, code in [(exc.BadRequestError, 400), (exc.AuthenticationError, 401), (exc.PermissionDeniedError, 403),
                      (exc.NotFoundError, 404), (exc.ConflictError, 409), (exc.UnprocessableEntityError, 422),
                      (exc.RateLimitError, 429), (exc.InternalServerError, 500)]:
        assert issubclass(cls, exc.APIStatusError) and cls.status_code == code
    assert issubclass(exc.APITimeoutError, exc.APIConnectionError)
    assert issubclass(exc.APIConnectionError, exc.APIError)
    assert issubclass(exc.APIResponseValidationError, exc.APIError)
    assert issubclass(exc.ModelLoadError, exc.BadRequestError) and issubclass(exc.ModelLoadError, ValueError)
    assert issubclass(exc.RequestFailedError, exc.TinkerError)
    assert not issubclass(exc.RequestFailedError, exc.APIError)
    for cls in (exc.SidecarStartupError, exc.SidecarDiedError, exc.SidecarIPCError):
        assert issubclass(cls, exc.SidecarError)
    assert issubclass(exc.SidecarError, exc.TinkerError)
    assert str(exc.APITimeoutError()) == "Request timed out."
    assert exc.APIConnectionError().message == "Connection error."


def test_request_failed_error():
    err = exc.RequestFailedError("out of memory", "req-7", RequestErrorCategory.Server)
    assert (err.message, err.request_id, err.category) == ("out of memory", "req-7", RequestErrorCategory.Server)
    assert str(err) == "out of memory"
    assert exc.RequestFailedError("m", "r", "user").category is RequestErrorCategory.User
    assert exc.RequestFailedError("m", "r", "User").category is RequestErrorCategory.User
    assert exc.RequestFailedError("m", "r", "weird").category is RequestErrorCategory.Unknown
    assert exc.RequestFailedError("m").category is RequestErrorCategory.Unknown
    back = _roundtrip(err)
    assert back.category is RequestErrorCategory.Server and back.request_id == "req-7"
    with pytest.raises(exc.TinkerError):
        raise err
