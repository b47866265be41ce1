"""Encode / Export: the lossless ``.mcz`` codec of compressed models (DESIGN.md section 10).

``container`` holds the file format and the model-level API; ``streams`` the entropy coding
of one integer stream (constriction ANS, zstd, raw, const; the cheapest kept per stream);
``masks`` the ``ans_mask`` coder of 2-D survivor masks (row counts and column history).
"""

from moecomp.codec.container import (
    DEFAULT_MAX_BYTES,
    DTYPES,
    FLAG_HEADER_ZSTD,
    FORMAT_VERSION,
    MAGIC,
    MAX_ELEMENTS,
    MAX_HEADER_BYTES,
    DecodedModel,
    LayerRow,
    StreamInfo,
    decode_model,
    encode_model,
    inspect_mcz,
    inspect_model,
    read_mcz,
    write_mcz,
)
from moecomp.codec.streams import CODERS, CodedStream, decode_stream, encode_stream

__all__ = [
    "CODERS",
    "DEFAULT_MAX_BYTES",
    "DTYPES",
    "FLAG_HEADER_ZSTD",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_ELEMENTS",
    "MAX_HEADER_BYTES",
    "CodedStream",
    "DecodedModel",
    "LayerRow",
    "StreamInfo",
    "decode_model",
    "decode_stream",
    "encode_model",
    "encode_stream",
    "inspect_mcz",
    "inspect_model",
    "read_mcz",
    "write_mcz",
]
