"""Schemas the structured-output tests constrain to: nested objects, arrays with item
limits, enums, bounded integers, patterned strings, optional fields."""

from __future__ import annotations

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Z][a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "nickname": {"type": "string", "maxLength": 12},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}

ORDER = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 9999},
        "items": {
            "type": "array", "minItems": 1, "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                               "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["sku", "qty"], "additionalProperties": False,
            },
        },
        "status": {"enum": ["new", "paid", "shipped"]},
    },
    "required": ["id", "items", "status"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[A-Za-z ]{1,16}$"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}

TAGS = {
    "type": "object",
    "properties": {
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "meta": {"type": "object",
                 "properties": {"ok": {"type": "boolean"}, "level": {"enum": [1, 2, 3]}},
                 "required": ["ok"], "additionalProperties": False},
    },
    "required": ["tags", "meta"],
    "additionalProperties": False,
}

CHOICE = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                   "confidence": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}

ALL = {"person": PERSON, "order": ORDER, "weather": WEATHER, "tags": TAGS, "choice": CHOICE}
