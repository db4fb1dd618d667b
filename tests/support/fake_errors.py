"""What the fake Kaggle's modules share: the error a handler raises, the check of a request's raw
JSON keys against its kagglesdk type, and Kaggle's date format."""
from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from typing import Any

from kagglesdk.kaggle_object import KaggleObject, KaggleObjectSerializer, ListSerializer


class ApiError(Exception):
    """Answered as Kaggle answers a refused call: HTTP `status`, JSON {"code", "message"} (the
    client raises it as an HTTPError carrying `message` verbatim), or `body` where given."""

    def __init__(self, status: int, message: str, headers: dict | None = None,
                 body: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers, self.body = status, message, headers or {}, body


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def check_keys(cls: type, raw: Any, where: str) -> None:
    """Reject keys the request type does not have, recursively, and wrongly typed scalars."""
    if not isinstance(raw, dict):
        raise ApiError(400, f"{where}: expected an object")
    fields = {f.json_name: f for f in cls._fields}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ApiError(400, f"{where}: unknown field(s) {unknown} for {cls.__name__}")
    for name, value in raw.items():
        f, at = fields[name], f"{where}.{name}"
        is_object = isinstance(f.field_type, type) and issubclass(f.field_type, KaggleObject)
        if isinstance(f.serializer, ListSerializer):
            if not isinstance(value, list):
                raise ApiError(400, f"{at}: expected a list")
            for i, item in enumerate(value):
                if is_object:
                    check_keys(f.field_type, item, f"{at}[{i}]")
                elif f.field_type in (str, int, bool) and not _scalar_ok(f.field_type, item):
                    raise ApiError(400, f"{at}[{i}]: expected {f.field_type.__name__}")
        elif isinstance(f.serializer, KaggleObjectSerializer):
            check_keys(f.field_type, value, at)
        elif isinstance(f.field_type, type) and issubclass(f.field_type, Enum):
            if value not in f.field_type.__members__:
                raise ApiError(400, f"{at}: {value!r} is not a {f.field_type.__name__}")
        elif f.field_type in (str, int, bool) and not _scalar_ok(f.field_type, value):
            raise ApiError(400, f"{at}: expected {f.field_type.__name__}, got {value!r}")


def _scalar_ok(tp: type, value: Any) -> bool:
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)
