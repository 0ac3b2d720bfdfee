"""ModelInput: a sequence of chunks (token ids, images, audio) fed to a model.

Chunks are discriminated on their `type` field, so `model_dump()` / `model_validate()` round-trip.
Binary payloads (image data, dmel tensors) are bytes in Python and base64 strings when dumped.
"""

import base64
import binascii
import operator
from typing import Annotated, Any, List, Literal, Optional, TypeAlias, Union

import numpy as np
from pydantic import Field, field_serializer, field_validator

from ._base import StrictBase

__all__ = ["ModelInput", "ModelInputChunk", "EncodedTextChunk", "ImageChunk", "ImageAssetPointerChunk", "DmelChunk"]


def _decode_base64(value: Any, field: str) -> Any:
    if isinstance(value, str):
        if value.startswith("data:") and ";base64," in value:  # a data URL
            value = value.split(";base64,", 1)[1]
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{field}: a str value must be base64 (or pass raw bytes)") from None
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def _token_list(tokens: Any) -> Any:
    if isinstance(tokens, np.ndarray):
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"tokens must be a 1-D array of integer ids, got shape {tokens.shape} and dtype "
                             f"{tokens.dtype}")
        return tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not hasattr(tokens, "__iter__"):
        raise ValueError(f"tokens must be a sequence of integer token ids, got {type(tokens).__name__}")
    out = list(tokens)
    for i, token in enumerate(out):
        if type(token) is not int:
            if isinstance(token, (bool, np.bool_)) or not hasattr(token, "__index__"):
                raise ValueError(f"tokens[{i}] = {token!r} is not an integer token id")
            out[i] = operator.index(token)
    return out


class EncodedTextChunk(StrictBase):
    """Token ids."""

    tokens: List[int]
    type: Literal["encoded_text"] = "encoded_text"

    @field_validator("tokens", mode="before")
    @classmethod
    def _tokens(cls, value: Any) -> Any:
        return _token_list(value)

    @property
    def length(self) -> int:
        return len(self.tokens)


def _expected_length(chunk) -> int:
    """The positions an image chunk takes, as the SDK counts them: its expected_tokens (the engine computes the
    real count from the image and checks this one against it)."""
    if chunk.expected_tokens is None:
        raise ValueError(f"{type(chunk).__name__} expected_tokens needs to be set in order to compute the length")
    return chunk.expected_tokens


class ImageChunk(StrictBase):
    """An image, inline. `data` is bytes; a str is read as base64 (dumps write base64)."""

    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: Optional[int] = Field(default=None, ge=0)
    type: Literal["image"] = "image"

    @field_validator("data", mode="before")
    @classmethod
    def _data(cls, value: Any) -> Any:
        return _decode_base64(value, "ImageChunk.data")

    @field_serializer("data")
    def _dump_data(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    @property
    def length(self) -> int:
        """`expected_tokens`; ValueError when it is not set."""
        return _expected_length(self)


class ImageAssetPointerChunk(StrictBase):
    """An image stored elsewhere, referenced by `location`."""

    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: Optional[int] = Field(default=None, ge=0)
    type: Literal["image_asset_pointer"] = "image_asset_pointer"

    @property
    def length(self) -> int:
        """`expected_tokens`; ValueError when it is not set."""
        return _expected_length(self)


def _read_varint(data: bytes, offset: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if offset >= len(data) or shift > 63:
            raise ValueError("DmelChunk.dmel has a truncated or malformed tensor header")
        byte = data[offset]
        offset += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, offset
        shift += 7


class DmelChunk(StrictBase):
    """Audio as a serialized DMel token tensor (Tinker's TensorContainer bytes; base64 when dumped)."""

    dmel: bytes
    type: Literal["dmel"] = "dmel"

    @field_validator("dmel", mode="before")
    @classmethod
    def _dmel(cls, value: Any) -> Any:
        return _decode_base64(value, "DmelChunk.dmel")

    @field_serializer("dmel")
    def _dump_dmel(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    @property
    def length(self) -> int:
        """The first dimension of the serialized tensor, read from its header: an optional constant
        marker byte (254), a dtype byte (0-7), a varint ndim, then varint dims. ValueError if the
        header cannot be read or the tensor is 0-d."""
        data = self.dmel
        offset = 1 if data[:1] == b"\xfe" else 0
        if offset >= len(data) or data[offset] > 7:
            raise ValueError("DmelChunk.dmel does not start with a TensorContainer header")
        ndim, offset = _read_varint(data, offset + 1)
        if ndim == 0:
            raise ValueError("DmelChunk.dmel holds a 0-d tensor, which has no length")
        first, _ = _read_varint(data, offset)
        return first


ModelInputChunk: TypeAlias = Annotated[
    Union[EncodedTextChunk, ImageChunk, ImageAssetPointerChunk, DmelChunk], Field(discriminator="type")
]

_CHUNK_TYPES = (EncodedTextChunk, ImageChunk, ImageAssetPointerChunk, DmelChunk)


class ModelInput(StrictBase):
    """A model's input: a list of chunks. Build one from token ids with `from_ints`."""

    chunks: List[ModelInputChunk]

    @field_validator("chunks", mode="before")
    @classmethod
    def _chunks(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            # a dict chunk without a "type" but with "tokens" is text (the common case)
            return [{**c, "type": "encoded_text"} if isinstance(c, dict) and "type" not in c and "tokens" in c else c
                    for c in value]
        return value

    @classmethod
    def from_ints(cls, tokens: List[int]) -> "ModelInput":
        """One text chunk holding `tokens`."""
        return cls(chunks=[EncodedTextChunk(tokens=tokens)])

    @classmethod
    def empty(cls) -> "ModelInput":
        return cls(chunks=[])

    def to_ints(self) -> List[int]:
        """All token ids; ValueError if any chunk is not text."""
        others = [type(c).__name__ for c in self.chunks if not isinstance(c, EncodedTextChunk)]
        if others:
            raise ValueError(f"to_ints() needs a ModelInput of EncodedTextChunks only; this one also has "
                             f"{', '.join(others)}")
        return [token for chunk in self.chunks for token in chunk.tokens]

    @property
    def length(self) -> int:
        """Total number of tokens (context length) of all chunks."""
        return sum(chunk.length for chunk in self.chunks)

    def append(self, chunk: ModelInputChunk) -> "ModelInput":
        """A new ModelInput with `chunk` added at the end."""
        if not isinstance(chunk, _CHUNK_TYPES):
            raise TypeError(f"append() takes a chunk ({', '.join(t.__name__ for t in _CHUNK_TYPES)}), got "
                            f"{type(chunk).__name__}; use append_int() for a token id")
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> "ModelInput":
        """A new ModelInput with a one-token text chunk added at the end."""
        return self.append(EncodedTextChunk(tokens=[token]))
