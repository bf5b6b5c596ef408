"""The server's OpenAPI 3 document (``GET /v2/openapi.json``): the v2 REST routes it
serves, the JSON request and response bodies, and every status a route may answer.

>>> DOCUMENT["paths"]["/v2/models/{model_name}/infer"]["post"]["operationId"]
'infer'
"""

from __future__ import annotations

from .protocol import DataType

__all__ = ["DOCUMENT"]


def _error(description: str) -> dict:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _retry(description: str) -> dict:
    out = _error(description)
    out["headers"] = {"Retry-After": {"schema": {"type": "string"},
                                      "description": "seconds to wait before retrying"}}
    return out


_MODEL = {"name": "model_name", "in": "path", "required": True, "schema": {"type": "string"}}
_VERSION = {"name": "model_version", "in": "path", "required": True, "schema": {"type": "string"}}
_TENSOR_SHAPE = {"type": "array", "items": {"type": "integer", "minimum": 0}}
_PARAMETERS = {"type": "object", "additionalProperties": True}


def _infer(operation_id: str, parameters: list) -> dict:
    return {"post": {
        "operationId": operation_id,
        "summary": "Run the model on the request's inputs",
        "parameters": parameters,
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferRequest"}}}},
        "responses": {
            "200": {"description": "the outputs", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/InferResponse"}},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "400": _error("a malformed request: bad JSON, unknown datatype, data that does "
                          "not fill its shape, an unknown output"),
            "404": _error("no such model"),
            "413": _error("the body is larger than --max-request-bytes"),
            "422": _error("the model rejected the inputs (wrong shape or count for it)"),
            "429": _retry("the model's queue is full"),
            "500": _error("the model's result cannot be encoded"),
            "503": _retry("the interpreter crashed while running the request, or the server "
                          "is shutting down"),
            "504": _error("the request's deadline passed"),
        }}}


def _get(operation_id: str, summary: str, responses: dict, parameters: list = ()) -> dict:
    return {"get": {"operationId": operation_id, "summary": summary,
                    "parameters": list(parameters), "responses": responses}}


_READY = {"200": {"description": "ready"}, "503": {"description": "not ready"}}

DOCUMENT: dict = {
    "openapi": "3.0.3",
    "info": {"title": "multipy serve: Open Inference Protocol (v2 REST)", "version": "2"},
    "paths": {
        "/v2": _get("server_metadata", "Server name, version and protocol extensions", {
            "200": {"description": "metadata", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ServerMetadata"}}}}}),
        "/v2/health/live": _get("server_live", "The server process answers",
                                {"200": {"description": "live"}}),
        "/v2/health/ready": _get("server_ready", "Every model can be served now", _READY),
        "/v2/models/{model_name}": _get("model_metadata", "What is known of the model", {
            "200": {"description": "metadata", "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ModelMetadata"}}}},
            "404": _error("no such model")}, [_MODEL]),
        "/v2/models/{model_name}/ready": _get("model_ready", "The model can be served now",
                                              {**_READY, "404": _error("no such model")},
                                              [_MODEL]),
        "/v2/models/{model_name}/infer": _infer("infer", [_MODEL]),
        "/v2/models/{model_name}/versions/{model_version}/infer":
            _infer("infer_version", [_MODEL, _VERSION]),
    },
    "components": {"schemas": {
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"}}},
        "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"],
                           "properties": {"name": {"type": "string"},
                                          "version": {"type": "string"},
                                          "extensions": {"type": "array",
                                                         "items": {"type": "string"}}}},
        "MetadataTensor": {"type": "object", "required": ["name", "datatype", "shape"],
                           "properties": {"name": {"type": "string"},
                                          "datatype": {"type": "string"},
                                          "shape": {"type": "array",
                                                    "items": {"type": "integer"}}}},
        "ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs", "outputs"],
                          "properties": {
                              "name": {"type": "string"},
                              "versions": {"type": "array", "items": {"type": "string"}},
                              "platform": {"type": "string"},
                              "inputs": {"type": "array", "items": {
                                  "$ref": "#/components/schemas/MetadataTensor"}},
                              "outputs": {"type": "array", "items": {
                                  "$ref": "#/components/schemas/MetadataTensor"}}}},
        "RequestInput": {"type": "object", "required": ["name", "shape", "datatype"],
                         "properties": {"name": {"type": "string"},
                                        "shape": _TENSOR_SHAPE,
                                        "datatype": {"type": "string",
                                                     "enum": [d.value for d in DataType]},
                                        "parameters": _PARAMETERS,
                                        "data": {"type": "array"}}},
        "RequestOutput": {"type": "object", "required": ["name"],
                          "properties": {"name": {"type": "string"},
                                         "parameters": _PARAMETERS}},
        "InferRequest": {"type": "object", "required": ["inputs"],
                         "properties": {
                             "id": {"type": "string"},
                             "parameters": _PARAMETERS,
                             "inputs": {"type": "array", "minItems": 1, "items": {
                                 "$ref": "#/components/schemas/RequestInput"}},
                             "outputs": {"type": "array", "items": {
                                 "$ref": "#/components/schemas/RequestOutput"}}}},
        "ResponseOutput": {"type": "object", "required": ["name", "shape", "datatype"],
                           "properties": {"name": {"type": "string"},
                                          "shape": _TENSOR_SHAPE,
                                          "datatype": {"type": "string"},
                                          "parameters": _PARAMETERS,
                                          "data": {"type": "array"}}},
        "InferResponse": {"type": "object", "required": ["model_name", "outputs"],
                          "properties": {
                              "model_name": {"type": "string"},
                              "model_version": {"type": "string"},
                              "id": {"type": "string"},
                              "outputs": {"type": "array", "items": {
                                  "$ref": "#/components/schemas/ResponseOutput"}}}},
    }},
}
