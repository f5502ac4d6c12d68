#!/usr/bin/env python3
"""Write ``.cog/openapi_schema.json`` for a predictor, as ``cog build`` would, without the cog CLI.

    scripts/gen_schema.py [REF] [--out PATH] [--check]
    scripts/gen_schema.py examples/llm/predict.py:Runner        # writes examples/llm/.cog/openapi_schema.json

REF is ``FILE.py:CLASS``, relative to the current directory (default ``predict.py:Runner``). The file's directory
is the model's project dir (``/src`` in its image; where ``scripts/predict`` runs the runtime), so the schema goes
to ``.cog/openapi_schema.json`` there unless ``--out`` says otherwise, and ``info.x-predictor`` is the stub as the
runtime is given it there (``predict.py:Runner``). The Cog runtime (coglet 0.23.1)
validates request inputs against ``components.schemas.Input`` of ``.cog/openapi_schema.json``, read relative to its
working directory; with no file it logs a warning and accepts any input. Only the cog CLI writes that file
(its Go generator); cog 0.23.1's Python package has an inspector but no schema writer, so this script builds the
document from the inspector's own input fields (same defaults, constraints and type rules as the runtime's SDK).
Outputs are resolved recursively like the CLI does (``list[list[float]]`` is fine there; the Python inspector rejects
nested lists). Importing the predictor imports its module (torch for ours) but never runs ``setup()``.

``--check`` exits 1 if the file on disk differs from what would be written (for CI).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import sys
import typing
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent  # compile_cache itself, when run from another directory
SCHEMA = Path(".cog/openapi_schema.json")  # in the project dir: where the runtime reads it


def load_predictor(ref: str) -> type:
    """``path/to/file.py:Class`` (relative to the cwd, as the runtime resolves it) → the class."""
    path_s, sep, name = ref.partition(":")
    if not sep or not name:
        raise SystemExit(f"predictor ref must be FILE.py:NAME, got {ref!r}")
    path = Path(path_s).resolve()
    for p in (ROOT, Path.cwd()):  # the predictor imports its siblings (cwd first, as in the runtime)
        if str(p) not in sys.path:
            sys.path.insert(0, str(p))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    try:
        return getattr(module, name)
    except AttributeError:
        raise SystemExit(f"{path} has no {name}") from None


def _predict_fn(cls: type) -> Any:
    from cog import _inspector

    with warnings.catch_warnings():  # "predict() is deprecated; use run()": both work in 0.23
        warnings.simplefilter("ignore", DeprecationWarning)
        fn_name, fn = _inspector._selected_predict_method(cls, cls.__qualname__)
    fn = _inspector._unwrap(fn)
    _inspector._validate_run_or_predict(fn, fn_name, True)
    return fn


def input_schema(cls: type) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the ``Input`` object schema, enum schemas for inputs with ``choices``) — cog's layout and titles."""
    from dataclasses import MISSING, Field

    from cog import _adt, _inspector

    fn = _predict_fn(cls)
    spec = inspect.getfullargspec(fn)
    hints = typing.get_type_hints(fn, include_extras=True)
    names = spec.args[1:]
    defaults = list(spec.defaults or [])
    raw_defaults = [None] * (len(names) - len(defaults)) + defaults
    props: dict[str, Any] = {}
    required: list[str] = []
    enums: dict[str, Any] = {}
    for order, (name, raw) in enumerate(zip(names, raw_defaults, strict=True)):
        if name not in hints:
            raise SystemExit(f"input {name!r} has no type annotation")
        field = _inspector._create_input_field(order, name, _inspector._strip_non_opaque_annotated(hints[name]), raw)
        prop: dict[str, Any] = {"x-order": order}
        if field.choices is not None:
            enums[name] = {"title": name, "description": "An enumeration.", "enum": field.choices,
                           **field.type.primitive.json_type()}
            prop["allOf"] = [{"$ref": f"#/components/schemas/{name}"}]
        else:
            prop["title"] = name.replace("_", " ").title()
            prop.update(field.type.json_type())
        default = field.default
        if isinstance(default, Field):
            default = (default.default_factory() if default.default_factory is not MISSING  # type: ignore[misc]
                       else None if default.default is MISSING else default.default)
        optional = field.type.repetition in (_adt.Repetition.OPTIONAL, _adt.Repetition.OPTIONAL_REPEATED)
        if default is not None:
            prop["default"] = field.type.json_encode(field.type.normalize(default))
        elif not optional:
            required.append(name)
        if field.type.repetition is _adt.Repetition.OPTIONAL:
            prop["nullable"] = True
        for attr, key in (("description", "description"), ("ge", "minimum"), ("le", "maximum"),
                          ("min_length", "minLength"), ("max_length", "maxLength"), ("regex", "pattern"),
                          ("deprecated", "deprecated")):
            value = getattr(field, attr)
            if value is not None:
                # cog stores ge/le as floats; an integral bound reads better (and as the CLI writes it) as an int
                prop[key] = int(value) if isinstance(value, float) and value.is_integer() else value
        props[name] = prop
    schema: dict[str, Any] = {"title": "Input", "type": "object", "properties": props}
    if required:
        schema["required"] = required
    return schema, enums


def _type_schema(tp: Any) -> dict[str, Any]:
    """A JSON schema for an output type annotation, recursing into list[...] and dict[str, ...]."""
    from cog import _adt

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _type_schema(args[0])
    if tp is Any or tp is dict or (origin is dict and not args):
        return {"type": "object"}
    if origin is dict:
        return {"type": "object", "additionalProperties": _type_schema(args[1])}
    if tp is list or (origin is list and not args):
        return {"type": "array", "items": {"type": "object"}}
    if origin is list:
        return {"type": "array", "items": _type_schema(args[0])}
    return _adt.PrimitiveType.from_type(tp).json_type()


def output_schema(cls: type) -> dict[str, Any]:
    from cog import _inspector

    fn = _predict_fn(cls)
    ret = _inspector._strip_non_opaque_annotated(typing.get_type_hints(fn, include_extras=True)["return"])
    try:  # cog's own rules first (iterators, BaseModel outputs, Path/Secret, ...)
        return _inspector._create_output_type(ret).json_type()
    except ValueError:  # e.g. "List cannot have nested type list": resolve recursively as the CLI does
        return {"title": "Output", **_type_schema(ret)}


def _json_response(ref: str | None) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"} if ref else {}}}


def openapi(cls: type, ref: str) -> dict[str, Any]:
    """The OpenAPI 3.0.2 document the runtime serves at GET /openapi.json and validates inputs with.

    ``info.x-predictor`` names the predictor it was made for: the runtime reads the file from its cwd whatever
    ``COG_PREDICT_TYPE_STUB`` says, so a check can catch a schema left over from another predictor."""
    inputs, enums = input_schema(cls)
    ok = {"description": "Successful Response"}
    invalid = {"description": "Validation Error", "content": _json_response("HTTPValidationError")}
    ts = {"type": "string", "format": "date-time"}
    return {
        "openapi": "3.0.2",
        "info": {"title": "Cog", "version": "0.1.0", "x-predictor": ref},
        "paths": {
            "/health-check": {"get": {
                "summary": "Healthcheck",
                "responses": {"200": {**ok, "content": _json_response(None)}},
            }},
            "/predictions": {"post": {
                "summary": "Predict",
                "requestBody": {"content": _json_response("PredictionRequest")},
                "responses": {"200": {**ok, "content": _json_response("PredictionResponse")}, "422": invalid},
            }},
            "/predictions/{prediction_id}/cancel": {"post": {
                "summary": "Cancel",
                "parameters": [{"name": "prediction_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {**ok, "content": _json_response(None)}, "422": invalid},
            }},
        },
        "components": {"schemas": {
            "Input": inputs,
            "Output": output_schema(cls),
            **enums,
            "PredictionRequest": {"title": "PredictionRequest", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"},
            }},
            "PredictionResponse": {"title": "PredictionResponse", "type": "object", "properties": {
                "id": {"title": "Id", "type": "string"},
                "input": {"$ref": "#/components/schemas/Input"},
                "output": {"$ref": "#/components/schemas/Output"},
                "status": {"$ref": "#/components/schemas/Status"},
                "error": {"title": "Error", "type": "string"},
                "logs": {"title": "Logs", "type": "string"},
                "metrics": {"title": "Metrics", "type": "object"},
                "created_at": {"title": "Created At", **ts},
                "started_at": {"title": "Started At", **ts},
                "completed_at": {"title": "Completed At", **ts},
            }},
            "Status": {"title": "Status", "type": "string",
                       "enum": ["starting", "processing", "succeeded", "canceled", "failed"]},
            "HTTPValidationError": {"title": "HTTPValidationError", "type": "object", "properties": {
                "detail": {"title": "Detail", "type": "array",
                           "items": {"$ref": "#/components/schemas/ValidationError"}},
            }},
            "ValidationError": {"title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
                                "properties": {
                                    "loc": {"title": "Location", "type": "array",
                                            "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                                    "msg": {"title": "Message", "type": "string"},
                                    "type": {"title": "Error Type", "type": "string"},
                                }},
        }},
    }


def project(ref: str) -> tuple[Path, str]:
    """(the runner's project dir, the stub the runtime is given there): see compile_cache.tools.cogrun.project_of."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from compile_cache.tools.cogrun import project_of  # no torch there

    try:
        return project_of(ref)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(str(e)) from None


def render(ref: str) -> str:
    stub = project(ref)[1]
    return json.dumps(openapi(load_predictor(ref), stub), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", nargs="?", default="predict.py:Runner", help="FILE.py:CLASS, relative to the cwd")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"default: {SCHEMA} in the runner file's directory (its project dir)")
    ap.add_argument("--check", action="store_true", help="exit 1 if --out is missing or stale; write nothing")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = project(args.ref)[0] / SCHEMA
    text = render(args.ref)
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run scripts/gen_schema.py {args.ref}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".incomplete")
    tmp.write_text(text)
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
