"""Reading the JSON files of a checkpoint (config.json, shard indexes, manifests) with errors that name the file."""

from __future__ import annotations

import json
from typing import Any


def read_json(path: str, error: type[Exception], what: str = "JSON file", kind: type = dict) -> Any:
    """The parsed contents of `path`, which must be a JSON `kind` (an object by default).

    A file that is not valid UTF-8 JSON, or whose top level is not `kind`, raises `error` (a project error
    class such as `ConfigError` or `CheckpointError`) naming the file and the position of the problem.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not a valid {what}: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except UnicodeDecodeError as e:
        raise error(f"{path}: not a valid {what}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    if not isinstance(value, kind):
        raise error(f"{path}: not a valid {what}: expected a JSON {_json_name(kind)}, got a JSON "
                    f"{_json_name(type(value))}")
    return value


def _json_name(kind: type) -> str:
    return {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(kind, kind.__name__)
