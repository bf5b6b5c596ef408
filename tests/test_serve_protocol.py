"""The v2 codec on its own: no server, no interpreters.

Round trips over every datatype and shape (hypothesis), JSON and binary, and
every malformed body answered with BadRequest naming the problem.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import multipy

from multipy.serve.protocol import (BadRequest, DataType, InferenceError, RequestedOutput,
                                    decode_request, decode_response, encode_request,
                                    encode_response, output_names)

NUMERIC = [d for d in DataType if d is not DataType.BYTES]
shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4)


def _tensor(datatype: DataType, shape: list[int], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dtype = datatype.torch_dtype
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    high = 100 if dtype in (torch.int8, torch.uint8) else 10_000
    low = 0 if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else -high
    return torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)


@settings(max_examples=150, deadline=None)
@given(datatype=st.sampled_from(NUMERIC), shape=shapes, seed=st.integers(0, 2**31),
       binary=st.booleans())
def test_a_tensor_survives_request_and_response(datatype, shape, seed, binary):
    value = _tensor(datatype, shape, seed)
    body, header = encode_request([("x", value)], binary=binary, binary_output=binary)
    request = decode_request(body, header)
    (decoded,) = request.args
    assert decoded.dtype == value.dtype and decoded.shape == value.shape
    assert torch.equal(decoded, value)
    encoded = encode_response("m", decoded, request=request)
    assert (encoded.header_length is not None) == (binary and value.numel() >= 0)
    out = decode_response(encoded.body, encoded.header_length)["OUTPUT__0"]
    assert out.dtype == value.dtype and torch.equal(out, value)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_a_result_that_views_another_tensor_is_answered_in_row_major_order(binary):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    request = decode_request(*encode_request([("x", base)], binary_output=binary))
    for value in (base.t(), base[:, ::2], torch._neg_view(base), base.to(torch.int16).t()):
        encoded = encode_response("m", value, request=request)
        out = decode_response(encoded.body, encoded.header_length)["OUTPUT__0"]
        assert out.dtype == value.dtype and torch.equal(out, value.resolve_neg())


@settings(max_examples=50, deadline=None)
@given(items=st.lists(st.binary(max_size=20), min_size=1, max_size=5), binary=st.booleans())
def test_bytes_survive_binary_and_json_survives_text(items, binary):
    if not binary:
        items = [b.decode("latin-1").encode() for b in items]  # valid UTF-8
    body, header = encode_request([("s", items)], binary=binary)
    (decoded,) = decode_request(body, header).args
    assert decoded == items


def test_binary_tensors_view_a_writable_body_and_are_aligned():
    inputs = [("a", torch.tensor([1, 2, 3], dtype=torch.uint8)), ("x", torch.arange(1.0, 7.0)),
              ("y", torch.arange(1.0, 5.0, dtype=torch.float64))]
    body, header = encode_request(inputs, binary=True)
    body = bytearray(body)
    args = decode_request(body, header).args
    for (_, want), got in zip(inputs, args):
        assert torch.equal(got, want) and got.data_ptr() % got.element_size() == 0
    body[header:] = bytes(len(body) - header)  # the tensors that are views see this
    viewed = [name for (name, want), got in zip(inputs, args) if not torch.equal(got, want)]
    assert "a" in viewed  # bytes are always aligned: a view, not a copy


def test_inputs_become_positional_arguments_in_request_order():
    body, _ = encode_request([("b", torch.ones(1)), ("a", torch.zeros(2))])
    args = decode_request(body).args
    assert [a.shape for a in args] == [torch.Size([1]), torch.Size([2])]


def test_json_data_may_be_nested_in_row_major_order():
    body = json.dumps({"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32",
                                   "data": [[1, 2], [3, 4]]}]}).encode()
    assert decode_request(body).args[0].tolist() == [[1, 2], [3, 4]]


def test_outputs_are_named_like_tritons_pytorch_backend_or_by_the_model():
    pair = (torch.ones(1), torch.zeros(1))
    assert [n for n, _ in output_names(pair)] == ["OUTPUT__0", "OUTPUT__1"]
    assert [n for n, _ in output_names(pair, ["sum", "max"])] == ["sum", "max"]
    assert [n for n, _ in output_names({"logits": torch.ones(1)})] == ["logits"]


def test_requested_outputs_pick_and_mix_binary_and_json():
    request = decode_request(*encode_request(
        [("x", torch.ones(2))], outputs=[RequestedOutput("OUTPUT__1", True),
                                         RequestedOutput("OUTPUT__0", False)]))
    encoded = encode_response("m", (torch.ones(2), torch.arange(3)), request=request)
    out = decode_response(encoded.body, encoded.header_length)
    assert list(out) == ["OUTPUT__1", "OUTPUT__0"]
    assert out["OUTPUT__1"].tolist() == [0, 1, 2]
    with pytest.raises(BadRequest, match="no output 'nope'; its outputs are OUTPUT__0"):
        encode_response("m", torch.ones(1), request=decode_request(*encode_request(
            [("x", torch.ones(1))], outputs=[RequestedOutput("nope")])))


def test_nan_and_infinities_survive_a_json_response():
    value = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.5])
    body = encode_response("m", value).body
    assert b"NaN" in body and b"-Infinity" in body  # what Python's json reads back
    torch.testing.assert_close(decode_response(body)["OUTPUT__0"], value, equal_nan=True)


def test_the_clients_timeout_is_read_in_microseconds():
    body, _ = encode_request([("x", torch.ones(1))], timeout=0.25)
    assert json.loads(body)["parameters"]["timeout"] == 250_000
    assert decode_request(body).timeout == pytest.approx(0.25)


def _input(**fields):
    spec = {"name": "x", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    spec.update(fields)
    return json.dumps({"inputs": [{k: v for k, v in spec.items() if v is not None}]}).encode()


@pytest.mark.parametrize("body, header, message", [
    (b"{", None, "not valid JSON"),
    (b"\xff\xfe", None, "not valid JSON"),
    (b"[1]", None, "must be a JSON object, got list"),
    (b"{}", None, "has no 'inputs'"),
    (b'{"inputs": []}', None, "has no inputs"),
    (b'{"inputs": [3]}', None, "inputs[0] must be an object"),
    (_input(datatype="FP99"), None, "unknown datatype 'FP99'"),
    (_input(shape=[3]), None, "data has 2 elements but shape [3] needs 3"),
    (_input(shape=[-1]), None, "shape must be a list of non-negative integers"),
    (_input(shape="2"), None, "'shape' must be a list, got str"),
    (_input(data=[[1.0], [2.0, 3.0]]), None, "ragged"),
    (_input(data=["a", "b"]), None, "data for FP32 must be numbers, got strings"),
    (_input(datatype="INT8", data=[1, 300]), None, "do not fit INT8"),
    (_input(datatype="INT32", data=[1.5, 2.0]), None, "must be integers, got numbers"),
    (_input(datatype="BOOL", data=[1, 0]), None, "must be booleans, got integers"),
    (_input(data=None), None, "neither 'data' nor parameters.binary_data_size"),
    (_input(data=None, parameters={"binary_data_size": 8}), 0, "runs past the end"),
    (_input(name=None), None, "has no 'name'"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}], '
     b'"parameters": {"timeout": -5}}', None, "positive number of microseconds"),
    (b'{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1]}]}', 500,
     "Inference-Header-Content-Length is 500 but the body has"),
])
def test_a_malformed_request_is_a_bad_request_naming_the_problem(body, header, message):
    if header == 0:
        header = len(body)
    with pytest.raises(BadRequest) as info:
        decode_request(body, header)
    assert info.value.status == 400
    assert message in info.value.message


def test_binary_data_must_fill_the_shape_exactly():
    body, header = encode_request([("x", torch.ones(4))], binary=True)
    doc = json.loads(body[:header])
    doc["inputs"][0]["shape"] = [3]
    head = json.dumps(doc).encode()
    with pytest.raises(BadRequest, match=r"shape \[3\] of FP32 needs 12 bytes, got 16"):
        decode_request(head + body[header:], len(head))
    with pytest.raises(BadRequest, match="4 bytes of binary data that no input claims"):
        decode_request(body + b"\0" * 4, header)


def test_a_result_the_protocol_cannot_carry_is_a_server_error_naming_it():
    with pytest.raises(InferenceError, match="output 'OUTPUT__0' is a object") as info:
        encode_response("m", object())
    assert info.value.status == 500
    with pytest.raises(InferenceError, match="dtype torch.complex64, which the protocol lacks"):
        encode_response("m", torch.ones(1, dtype=torch.complex64))


def test_importing_multipy_or_the_codec_imports_no_web_framework():
    code = ("import sys, multipy, multipy.serve, multipy.serve.protocol; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'prometheus_client') "
            "if m in sys.modules))")
    src = str(Path(multipy.__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": src})
    assert out.stdout.strip() == "[]"
