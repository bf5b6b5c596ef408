"""The Open Inference Protocol (KServe v2) request/response codec.

No HTTP here: this module turns request bodies into tensors and results into
response bodies, and names what went wrong with a status the front end
forwards.  The Starlette app (:mod:`multipy.serve.app`) and a Ray Serve
deployment both call it, so both speak the protocol the same way.

::

    body bytes ──decode_request──▶ InferRequest(inputs: [InferInput(name, tensor)], outputs, timeout)
                                        │ model(*tensors)         (the caller's business)
    body bytes ◀──encode_response── result: Tensor | tuple | list | dict of tensors

Two encodings of a body, both from the protocol:

* **JSON**: ``{"inputs": [{"name", "shape", "datatype", "data"}]}``, ``data``
  in row-major order (flat or nested);
* **Triton's binary-tensor extension**: the JSON header comes first, its length
  in the ``Inference-Header-Content-Length`` header, and each input with a
  ``parameters.binary_data_size`` takes that many raw little-endian bytes
  from what follows, in input order.  ``tritonclient`` sends this by default.

Outputs are named after Triton's PyTorch backend (``OUTPUT__0``, ``OUTPUT__1``,
...) for a tensor or a tuple/list result, by key for a dict result, or by the
names the model declares.  A request asks for binary outputs with
``parameters.binary_data_output`` or per output with
``outputs[i].parameters.binary_data``.

>>> import torch
>>> body, length = encode_request([("INPUT__0", torch.ones(2, 2))])
>>> decode_request(body, length).inputs[0].data
tensor([[1., 1.],
        [1., 1.]])
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson
import torch

__all__ = [
    "BadRequest", "DataType", "DeadlineExceeded", "Encoded", "InferInput", "InferRequest",
    "InferenceError", "ModelNotFound", "Overloaded", "PayloadTooLarge", "RequestedOutput",
    "Unavailable", "Unprocessable", "decode_request", "decode_response", "encode_request",
    "encode_response", "error_body", "output_names",
]

HEADER_LENGTH = "Inference-Header-Content-Length"  # the binary extension's HTTP header


# ----------------------------------------------------------------------------- errors
class InferenceError(Exception):
    """A request that cannot be answered with outputs; ``status`` is the HTTP status
    the protocol gives it and the body is ``{"error": message}``.

    Subclasses differ by who must act: the client fixes the request (400, 404,
    413, 422), or retries later (429, 503, after ``retry_after`` seconds), or
    gives the server more time (504).
    """

    status = 500
    retry_after: float | None = None

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if retry_after is not None:
            self.retry_after = retry_after


class BadRequest(InferenceError):
    """The body is not a valid inference request (malformed JSON, unknown datatype,
    data that does not fill its shape): the client must fix it."""

    status = 400


class ModelNotFound(InferenceError):
    """No model of that name is served here."""

    status = 404


class PayloadTooLarge(InferenceError):
    """The body is longer than the server accepts (``--max-request-bytes``)."""

    status = 413


class Unprocessable(InferenceError):
    """A well-formed request the model rejected (a wrong shape for it, a wrong
    number of inputs): the message carries the model's own error."""

    status = 422


class Overloaded(InferenceError):
    """The model's queue is full; retry after ``retry_after`` seconds.  Nothing ran."""

    status = 429


class Unavailable(InferenceError):
    """The server cannot serve now: the interpreter running the request crashed, or
    the server is shutting down.  Retry after ``retry_after`` seconds."""

    status = 503


class DeadlineExceeded(InferenceError):
    """The request's deadline passed before its answer was ready."""

    status = 504


def error_body(message: str) -> bytes:
    """The protocol's error body.

    >>> error_body("no model 'x'")
    b'{"error": "no model \\'x\\'"}'
    """
    return json.dumps({"error": message}).encode()


# -------------------------------------------------------------------------- datatypes
class DataType(str, enum.Enum):
    """The protocol's tensor datatypes (``BF16`` is Triton's extension)."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BF16 = "BF16"
    BYTES = "BYTES"

    @property
    def torch_dtype(self) -> torch.dtype:
        return _TORCH[self]

    @classmethod
    def of(cls, dtype: torch.dtype) -> "DataType":
        """The datatype of a torch dtype; raises ``KeyError`` for one the protocol lacks."""
        return _FROM_TORCH[dtype]


_TORCH = {
    DataType.BOOL: torch.bool, DataType.UINT8: torch.uint8, DataType.UINT16: torch.uint16,
    DataType.UINT32: torch.uint32, DataType.UINT64: torch.uint64, DataType.INT8: torch.int8,
    DataType.INT16: torch.int16, DataType.INT32: torch.int32, DataType.INT64: torch.int64,
    DataType.FP16: torch.float16, DataType.FP32: torch.float32, DataType.FP64: torch.float64,
    DataType.BF16: torch.bfloat16,
}
_FROM_TORCH = {v: k for k, v in _TORCH.items()}
_BY_NAME = {d.value: d for d in DataType}  # DataType(text) without Enum's call machinery
_BYTES, _BF16 = DataType.BYTES, DataType.BF16  # (an enum's attribute: a metaclass lookup per use)
_TEXT = {d: d.value for d in DataType}  # d.value without Enum's property
# The numpy dtype of each datatype numpy has (BF16 and BYTES: none).
_NUMPY = {d: torch.empty(0, dtype=t).numpy().dtype for d, t in _TORCH.items()
          if d is not DataType.BF16}
# Datatypes whose numpy arrays orjson writes itself (OPT_SERIALIZE_NUMPY), as floats
# and integers read back exactly; FP16 and BF16 go through Python floats (BF16 as FP32).
_ORJSON_NUMPY = frozenset({DataType.BOOL, DataType.UINT8, DataType.UINT16, DataType.UINT32,
                           DataType.UINT64, DataType.INT8, DataType.INT16, DataType.INT32,
                           DataType.INT64, DataType.FP32, DataType.FP64, DataType.BF16})
_INTEGERS = frozenset(d for d, t in _TORCH.items()
                      if not t.is_floating_point and d is not DataType.BOOL)
# numpy kinds a JSON value may have for each datatype ("b" bool, "i"/"u" int, "f" float).
_JSON_KINDS = {DataType.BOOL: "b", DataType.FP16: "iuf", DataType.FP32: "iuf",
               DataType.FP64: "iuf", DataType.BF16: "iuf"}


# ---------------------------------------------------------------------------- requests
# The request types are plain slotted dataclasses, not frozen ones: a frozen
# dataclass sets each field through object.__setattr__, which made building the two
# objects of a one-input request about 14,000 instructions of its ~85,000 to decode.
@dataclasses.dataclass(slots=True)
class InferInput:
    """One decoded input: a tensor, or for ``BYTES`` a flat list of ``bytes``."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    data: Any


@dataclasses.dataclass(slots=True)
class RequestedOutput:
    """An output the request names, and whether it wants it as binary data."""

    name: str
    binary: bool | None = None


@dataclasses.dataclass(slots=True)
class InferRequest:
    """A decoded inference request."""

    id: str | None
    inputs: tuple[InferInput, ...]
    outputs: tuple[RequestedOutput, ...] = ()
    binary_output: bool = False
    #: Seconds the client allows, from Triton's ``parameters.timeout`` (microseconds).
    timeout: float | None = None

    @property
    def args(self) -> tuple:
        """The model's positional arguments, in request order."""
        return tuple([i.data for i in self.inputs])  # (a list, not a generator: cheaper)


def _field(obj: Mapping, key: str, kind, where: str, *, required: bool = True):
    value = obj.get(key)
    if type(value) is kind:  # the common case: present, and of exactly that type
        return value
    if key not in obj:
        if required:
            raise BadRequest(f"{where} has no {key!r}")
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        name = " or ".join(_article(k.__name__) for k in kinds)
        raise BadRequest(f"{where}: {key!r} must be {name}, got {type(value).__name__}")
    return value


def _article(name: str) -> str:
    return {"dict": "an object", "list": "a list", "str": "a string", "int": "an integer",
            "float": "a number", "bool": "true or false"}.get(name, f"a {name}")


_NO_PARAMETERS: Mapping = {}  # (read only)
_NO_BINARY = memoryview(b"")  # a JSON body's binary part (read only; made once)


def _parameters(obj: Mapping, where: str) -> Mapping:
    params = _field(obj, "parameters", dict, where, required=False)
    return params if params is not None else {}


def decode_request(body: bytes | bytearray, header_length: int | None = None) -> InferRequest:
    """Decode an inference request body (JSON, or binary with ``header_length``).

    Binary tensors of a ``bytearray`` body are views of it (no copy).

    Raises :class:`BadRequest` naming the first problem found.

    >>> decode_request(b'{"inputs": [{"name": "x", "shape": [2], "datatype": "INT32", '
    ...                b'"data": [1, 2]}]}').inputs[0].data
    tensor([1, 2], dtype=torch.int32)
    """
    if header_length is None:
        header, binary = body, _NO_BINARY
    else:
        if not 0 <= header_length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {header_length} but the body has "
                             f"{len(body)} bytes")
        view = memoryview(body)
        header, binary = view[:header_length], view[header_length:]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"the request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the request must be a JSON object, got {type(doc).__name__}")
    # Each field is read with its type checked here; _field (which names the problem)
    # runs only for a field that is missing or of another type.
    inputs = doc.get("inputs")
    if type(inputs) is not list:
        inputs = _field(doc, "inputs", list, "the request")
    if not inputs:
        raise BadRequest("the request has no inputs")
    params = doc.get("parameters", _NO_PARAMETERS)
    if type(params) is not dict:
        params = _parameters(doc, "the request")
    request_id = doc.get("id")
    if type(request_id) is not str and "id" in doc:
        request_id = _field(doc, "id", str, "the request")
    decoded, offset = [], 0
    for i, spec in enumerate(inputs):
        item, offset = _decode_input(spec, i, binary, offset)
        decoded.append(item)
    if offset != len(binary):
        raise BadRequest(f"the body has {len(binary) - offset} bytes of binary data that no "
                         "input claims (check each input's binary_data_size)")
    outputs = []
    if "outputs" in doc:
        for i, spec in enumerate(_field(doc, "outputs", list, "the request", required=False)
                                 or ()):
            where = f"outputs[{i}]"
            if not isinstance(spec, dict):
                raise BadRequest(f"{where} must be an object, got {type(spec).__name__}")
            binary_flag = _field(_parameters(spec, where), "binary_data", bool, where,
                                 required=False)
            outputs.append(RequestedOutput(_field(spec, "name", str, where), binary_flag))
    binary_output = timeout = None
    if params:
        binary_output = _field(params, "binary_data_output", bool, "parameters", required=False)
        timeout = _field(params, "timeout", (int, float), "parameters", required=False)
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise BadRequest(f"parameters.timeout must be a positive number of microseconds, "
                             f"got {timeout}")
    return InferRequest(request_id, tuple(decoded), tuple(outputs), bool(binary_output),
                        None if timeout is None else timeout / 1e6)


def _decode_input(spec: Any, i: int, binary: memoryview, offset: int) -> tuple[InferInput, int]:
    if not isinstance(spec, dict):
        raise BadRequest(f"inputs[{i}] must be an object, got {type(spec).__name__}")
    name = spec.get("name")  # (types checked here; _field names a missing or wrong one)
    if type(name) is not str:
        name = _field(spec, "name", str, f"inputs[{i}]")
    shape = spec.get("shape")
    if type(shape) is not list:
        shape = _field(spec, "shape", list, _where(name))
    for d in shape:  # (a loop: a generator in all() costs more than the check)
        if type(d) is not int or d < 0:  # (JSON gives exact ints; true is a bool)
            raise BadRequest(f"{_where(name)}: shape must be a list of non-negative integers, "
                             f"got {shape}")
    text = spec.get("datatype")
    if type(text) is not str:
        text = _field(spec, "datatype", str, _where(name))
    datatype = _BY_NAME.get(text)
    if datatype is None:
        raise BadRequest(f"{_where(name)}: unknown datatype {text!r}; the protocol's datatypes "
                         f"are {', '.join(d.value for d in DataType)}")
    count = math.prod(shape)
    if "parameters" in spec:
        where = _where(name)
        size = _field(_parameters(spec, where), "binary_data_size", int, where, required=False)
        if size is not None:
            if "data" in spec:
                raise BadRequest(f"{where} has both 'data' and parameters.binary_data_size")
            if size < 0 or offset + size > len(binary):
                raise BadRequest(f"{where}: binary_data_size {size} runs past the end of the "
                                 f"body ({len(binary) - offset} bytes left)")
            chunk = binary[offset:offset + size]
            data = (_bytes_from_binary(chunk, count, where) if datatype is _BYTES
                    else _tensor_from_binary(chunk, datatype, shape, where))
            return InferInput(name, datatype, tuple(shape), data), offset + size
    if "data" not in spec:
        raise BadRequest(f"{_where(name)} has neither 'data' nor parameters.binary_data_size")
    data = (_bytes_from_json(spec["data"], count, _where(name)) if datatype is _BYTES
            else _tensor_from_json(spec["data"], datatype, shape, count, name))
    return InferInput(name, datatype, tuple(shape), data), offset


def _where(name: str) -> str:
    """How error messages name an input (made only for a message: it costs a repr)."""
    return f"input {name!r}"


def _tensor_from_binary(chunk: memoryview, datatype: DataType, shape: list[int], where: str):
    dtype = datatype.torch_dtype
    itemsize = dtype.itemsize
    count = math.prod(shape)
    if len(chunk) != count * itemsize:
        raise BadRequest(f"{where}: shape {shape} of {datatype.value} needs {count * itemsize} "
                         f"bytes, got {len(chunk)}")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    # A writable body (a bytearray) is viewed in place; the call then copies the
    # tensor once into shared memory.  A read-only one is copied here first.
    # A misaligned view is copied too: kernels may assume aligned elements.
    tensor = torch.frombuffer(chunk if not chunk.readonly else bytearray(chunk), dtype=dtype)
    if tensor.data_ptr() % itemsize:
        tensor = tensor.clone()
    return tensor.reshape(shape)


def _tensor_from_json(data: Any, datatype: DataType, shape: list[int], count: int, name: str):
    """The tensor of a JSON input's ``data`` (``count`` elements, ``math.prod(shape)``)."""
    try:
        array = np.asarray(data)
    except ValueError:
        raise BadRequest(f"{_where(name)}: data is ragged (nested lists of different lengths)"
                         ) from None
    size = array.size
    if size != count:
        raise BadRequest(f"{_where(name)}: data has {size} elements but shape {shape} needs "
                         f"{count}")
    if size:
        kinds, kind = _JSON_KINDS.get(datatype, "iu"), array.dtype.kind
        if kind not in kinds:
            raise BadRequest(f"{_where(name)}: data for {datatype.value} must be "
                             f"{_kind_words(kinds)}, got {_kind_words(kind)}")
        if datatype in _INTEGERS:
            info = torch.iinfo(datatype.torch_dtype)
            low, high = array.min(), array.max()
            if low < info.min or high > info.max:
                raise BadRequest(f"{_where(name)}: values from {low} to {high} do not fit "
                                 f"{datatype.value}")
    if datatype is _BF16:
        return torch.tensor(array.astype(np.float32).reshape(shape), dtype=torch.bfloat16)
    # Shaped by numpy, then viewed by torch: a torch reshape goes through its
    # dispatcher (several thousand instructions more for a small tensor).
    return torch.from_numpy(array.astype(_NUMPY[datatype], copy=False).reshape(shape))


def _kind_words(kinds: str) -> str:
    if kinds in ("iuf", "iu"):
        return {"iuf": "numbers", "iu": "integers"}[kinds]
    return {"b": "booleans", "i": "integers", "u": "integers", "f": "numbers",
            "U": "strings", "S": "strings"}.get(kinds, "mixed values")


def _bytes_from_json(data: Any, count: int, where: str) -> list[bytes]:
    flat = list(_flatten(data))
    if not all(isinstance(x, str) for x in flat):
        raise BadRequest(f"{where}: data for BYTES must be strings")
    if len(flat) != count:
        raise BadRequest(f"{where}: data has {len(flat)} elements but the shape needs {count}")
    return [x.encode() for x in flat]


def _flatten(data: Any):
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _bytes_from_binary(chunk: memoryview, count: int, where: str) -> list[bytes]:
    out, pos = [], 0
    while pos < len(chunk):
        if pos + 4 > len(chunk):
            raise BadRequest(f"{where}: BYTES data ends inside an element's length prefix")
        n = int.from_bytes(chunk[pos:pos + 4], "little")
        if pos + 4 + n > len(chunk):
            raise BadRequest(f"{where}: a BYTES element of {n} bytes runs past its data")
        out.append(bytes(chunk[pos + 4:pos + 4 + n]))
        pos += 4 + n
    if len(out) != count:
        raise BadRequest(f"{where}: data has {len(out)} elements but the shape needs {count}")
    return out


# ---------------------------------------------------------------------------- responses
@dataclasses.dataclass(slots=True)  # (not frozen: see InferInput)
class Encoded:
    """A body, and the JSON header's length when binary data follows it (send that
    as ``Inference-Header-Content-Length`` and the body as octet-stream)."""

    body: bytes
    header_length: int | None = None


def output_names(result: Any, declared: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """Name a model's result: ``OUTPUT__i`` (Triton's PyTorch backend), dict keys,
    or the ``declared`` names.

    >>> [n for n, _ in output_names((torch.ones(1), torch.zeros(1)))]
    ['OUTPUT__0', 'OUTPUT__1']
    """
    if isinstance(result, torch.Tensor):  # the common case, before the ABC checks
        return [(declared[0] if len(declared) == 1 else "OUTPUT__0", result)]
    if isinstance(result, Mapping):
        return [(str(k), v) for k, v in result.items()]
    values = list(result) if isinstance(result, (tuple, list)) and not _is_bytes_list(result) \
        else [result]
    names = list(declared) if len(declared) == len(values) else \
        [f"OUTPUT__{i}" for i in range(len(values))]
    return list(zip(names, values))


def _is_bytes_list(value) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) > 0
            and all(isinstance(x, (str, bytes)) for x in value))


def encode_response(model_name: str, result: Any, *, request: InferRequest | None = None,
                    model_version: str | None = None, declared: Sequence[str] = ()) -> Encoded:
    """The response body for a model's ``result``.

    Raises :class:`BadRequest` when the request names an output the model did
    not produce, and :class:`InferenceError` (500) for a result the protocol
    cannot carry (say which).

    >>> encode_response("m", torch.ones(2)).body
    b'{"model_name":"m","outputs":[{"name":"OUTPUT__0","datatype":"FP32","shape":[2],"data":[1.0,1.0]}]}'
    """
    wanted: Sequence[tuple[str, Any, bool]]
    binary_default = request.binary_output if request is not None else False
    if isinstance(result, torch.Tensor) and (request is None or not request.outputs):
        # The common case: one tensor, its one output (output_names, written out).
        wanted = ((declared[0] if len(declared) == 1 else "OUTPUT__0", result, binary_default),)
    elif request is not None and request.outputs:
        named = output_names(result, declared)
        by_name = dict(named)
        unknown = [o.name for o in request.outputs if o.name not in by_name]
        if unknown:
            raise BadRequest(f"the model has no output {', '.join(map(repr, unknown))}; "
                             f"its outputs are {', '.join(by_name) or 'none'}")
        wanted = [(o.name, by_name[o.name], binary_default if o.binary is None else o.binary)
                  for o in request.outputs]
    else:
        wanted = [(name, value, binary_default) for name, value in output_names(result, declared)]
    doc: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        doc["model_version"] = model_version
    if request is not None and request.id is not None:
        doc["id"] = request.id
    outputs, chunks = [], []
    for name, value, binary in wanted:  # (_tensor_body, written out: one dict per output)
        datatype, shape, flat, raw = _output_value(name, value, binary)
        if binary:
            chunks.append(raw)
            outputs.append({"name": name, "datatype": _TEXT[datatype], "shape": shape,
                            "parameters": {"binary_data_size": len(raw)}})
        else:
            outputs.append({"name": name, "datatype": _TEXT[datatype], "shape": shape,
                            "data": flat})
    doc["outputs"] = outputs
    header = _dumps(doc)
    if not chunks:
        return Encoded(header)
    return Encoded(b"".join([header, *chunks]), len(header))


def _tensor_body(name: str, value: Any, binary: bool, chunks: list) -> tuple:
    """``(datatype, shape, fields)`` of one tensor of a request or response: its
    ``data``, or (binary) its ``binary_data_size`` with its bytes appended to ``chunks``."""
    datatype, shape, flat, raw = _output_value(name, value, binary)
    if binary:
        chunks.append(raw)
        return datatype, shape, {"parameters": {"binary_data_size": len(raw)}}
    return datatype, shape, {"data": flat}


def _dumps(doc: dict) -> bytes:
    """``doc`` as JSON, its numpy arrays as lists."""
    body = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    # (find, not `in`: `in` on bytes first tries its operand as an int, and raises
    # and clears a TypeError for it, ~2,000 instructions a response)
    if body.find(b"null") != -1:
        # orjson writes NaN and infinities as null, json as NaN, Infinity and
        # -Infinity, which Python clients (tritonclient among them) read back.  No other
        # value of a body is null: only those bodies, or a name holding "null", come here.
        body = json.dumps(doc, default=np.ndarray.tolist).encode()
    return body


def _output_value(name: str, value: Any, binary: bool):
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            value = value.detach()
        if not value.is_cpu:
            value = value.cpu()
        return _tensor_value(name, value, binary)
    if _is_bytes_list(value):
        items = [v.encode() if isinstance(v, str) else v for v in value]
        if binary:
            raw = b"".join(len(v).to_bytes(4, "little") + v for v in items)
            return DataType.BYTES, [len(items)], None, raw
        try:
            return DataType.BYTES, [len(items)], [v.decode() for v in items], b""
        except UnicodeDecodeError:
            raise InferenceError(f"output {name!r} holds bytes that are not UTF-8; ask for it "
                                 "as binary data") from None
    if isinstance(value, (bool, int, float)):
        value = torch.tensor(value)
    if not isinstance(value, torch.Tensor):
        raise InferenceError(f"output {name!r} is a {type(value).__name__}; the protocol carries "
                             "tensors, lists of strings, and tuples or dicts of them")
    return _tensor_value(name, value.detach().cpu(), binary)


def _tensor_value(name: str, value: torch.Tensor, binary: bool):
    try:
        datatype = _FROM_TORCH[value.dtype]  # (DataType.of, without its call)
    except KeyError:
        raise InferenceError(f"output {name!r} has dtype {value.dtype}, which the protocol "
                             "lacks") from None
    if datatype in _NUMPY:
        # numpy's view of the tensor, flattened by numpy (in C order, copying only a
        # tensor that is not contiguous): each torch call costs its dispatcher.
        try:
            array = value.numpy()
        except (RuntimeError, TypeError):  # e.g. a tensor with its conjugate or negative bit set
            array = value.resolve_conj().resolve_neg().numpy()
        shape = list(array.shape)  # (numpy's: a torch size costs its dispatcher)
        if binary:
            return datatype, shape, None, array.tobytes()
        if datatype in _ORJSON_NUMPY:  # written by orjson straight from the array
            return datatype, shape, array.ravel(), b""  # (contiguous, as orjson needs)
        return datatype, shape, array.ravel().tolist(), b""
    # BF16, which numpy lacks: its bytes through torch, its JSON values as FP32.
    shape = list(value.shape)
    if binary:
        raw = value.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return datatype, shape, None, raw
    return datatype, shape, value.float().numpy().ravel(), b""


# ------------------------------------------------------------------------ client side
def encode_request(inputs: Sequence[tuple[str, Any]], *, binary: bool = False,
                   outputs: Sequence[RequestedOutput] = (), binary_output: bool = False,
                   timeout: float | None = None, request_id: str | None = None
                   ) -> tuple[bytes, int | None]:
    """A request body for ``(name, tensor)`` inputs, as a client sends it;
    returns ``(body, header_length)`` (``None`` for plain JSON).  For tests and
    benchmarks; ``tritonclient`` does the same for real clients.

    >>> encode_request([("x", torch.tensor([1, 2]))])[0]
    b'{"inputs":[{"name":"x","shape":[2],"datatype":"INT64","data":[1,2]}]}'
    """
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    specs, chunks = [], []
    for name, value in inputs:
        datatype, shape, body = _tensor_body(name, value, binary, chunks)
        specs.append({"name": name, "shape": shape, "datatype": datatype.value, **body})
    doc["inputs"] = specs
    if outputs:
        doc["outputs"] = [{"name": o.name, **({"parameters": {"binary_data": o.binary}}
                                               if o.binary is not None else {})} for o in outputs]
    params: dict[str, Any] = {}
    if binary_output:
        params["binary_data_output"] = True
    if timeout is not None:
        params["timeout"] = int(timeout * 1e6)
    if params:
        doc["parameters"] = params
    header = _dumps(doc)
    if not binary:
        return header, None
    return b"".join([header, *chunks]), len(header)


def decode_response(body: bytes, header_length: int | None = None) -> dict[str, Any]:
    """``{name: tensor or list of bytes}`` from a response body (the client side).

    >>> decode_response(encode_response("m", torch.ones(2)).body)
    {'OUTPUT__0': tensor([1., 1.])}
    """
    view = memoryview(body)
    header = view if header_length is None else view[:header_length]
    binary = memoryview(b"") if header_length is None else view[header_length:]
    doc = json.loads(bytes(header))
    if "error" in doc:
        raise InferenceError(doc["error"])
    out, offset = {}, 0
    for spec in doc["outputs"]:
        item, offset = _decode_input(spec, 0, binary, offset)
        out[spec["name"]] = item.data
    return out
