"""The grammars bench/structured_backends.py measures, each with an output that matches it, and the
JSON Schema coverage cases (schema, an instance that validates, one that does not)."""

from __future__ import annotations

# What pydantic writes for a small nested model (Optional -> anyOf with null, an Enum and a nested
# model under $defs, titles everywhere).
SMALL_SCHEMA = {
    "$defs": {
        "Address": {
            "properties": {
                "street": {"title": "Street", "type": "string"},
                "city": {"title": "City", "type": "string"},
                "zip_code": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Zip Code"},
            },
            "required": ["street", "city"],
            "title": "Address",
            "type": "object",
        },
        "Role": {"enum": ["admin", "editor", "viewer"], "title": "Role", "type": "string"},
    },
    "properties": {
        "name": {"title": "Name", "type": "string"},
        "age": {"title": "Age", "type": "integer"},
        "role": {"$ref": "#/$defs/Role"},
        "tags": {"items": {"type": "string"}, "title": "Tags", "type": "array"},
        "address": {"$ref": "#/$defs/Address"},
        "nickname": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None, "title": "Nickname"},
    },
    "required": ["name", "age", "role", "tags", "address"],
    "title": "User",
    "type": "object",
}

SMALL_INSTANCE = {
    "name": "Ada Lovelace",
    "age": 36,
    "role": "editor",
    "tags": ["math", "engines", "poetry"],
    "address": {"street": "12 St James's Square", "city": "London", "zip_code": None},
    "nickname": "The Enchantress of Numbers",
}

_NULLABLE_STR = {"anyOf": [{"type": "string"}, {"type": "null"}]}

# An e-commerce order: 32 top-level properties, 9 definitions, $ref, anyOf unions (discriminated by
# const), nullable fields, enums, patterns, formats, numeric bounds, arrays of objects, a map.
LARGE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "Order",
    "type": "object",
    "$defs": {
        "Address": {
            "type": "object",
            "properties": {
                "line1": {"type": "string", "maxLength": 120},
                "line2": _NULLABLE_STR,
                "city": {"type": "string"},
                "region": {"type": "string"},
                "postal_code": {"type": "string", "pattern": "^[A-Z0-9 -]{3,10}$"},
                "country": {"type": "string", "pattern": "^[A-Z]{2}$"},
            },
            "required": ["line1", "city", "postal_code", "country"],
        },
        "Customer": {
            "type": "object",
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "name": {"type": "string", "minLength": 1},
                "email": {"type": "string", "format": "email"},
                "phone": {"anyOf": [{"type": "string", "pattern": "^\\+[0-9]{7,15}$"}, {"type": "null"}]},
                "vip": {"type": "boolean"},
                "since": {"type": "string", "format": "date"},
            },
            "required": ["id", "name", "email"],
        },
        "Option": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
            "required": ["name", "value"],
        },
        "LineItem": {
            "type": "object",
            "properties": {
                "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "name": {"type": "string"},
                "category": {"enum": ["books", "electronics", "garden", "toys", "clothing", "food"]},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 999},
                "unit_price": {"type": "number", "minimum": 0},
                "options": {"type": "array", "items": {"$ref": "#/$defs/Option"}},
            },
            "required": ["sku", "name", "quantity", "unit_price"],
        },
        "PercentDiscount": {
            "type": "object",
            "properties": {"kind": {"const": "percent"}, "percent": {"type": "number", "minimum": 0, "maximum": 100}},
            "required": ["kind", "percent"],
        },
        "FixedDiscount": {
            "type": "object",
            "properties": {"kind": {"const": "fixed"}, "amount": {"type": "number", "minimum": 0}},
            "required": ["kind", "amount"],
        },
        "Card": {
            "type": "object",
            "properties": {
                "method": {"const": "card"},
                "brand": {"enum": ["visa", "mastercard", "amex"]},
                "last4": {"type": "string", "pattern": "^[0-9]{4}$"},
                "exp_month": {"type": "integer", "minimum": 1, "maximum": 12},
                "exp_year": {"type": "integer", "minimum": 2024},
            },
            "required": ["method", "brand", "last4"],
        },
        "Bank": {
            "type": "object",
            "properties": {"method": {"const": "bank_transfer"}, "iban": {"type": "string"}},
            "required": ["method", "iban"],
        },
        "Tracking": {
            "type": "object",
            "properties": {
                "carrier": {"enum": ["ups", "fedex", "dhl", "usps"]},
                "number": {"type": "string"},
                "url": {"type": "string", "format": "uri"},
            },
            "required": ["carrier", "number"],
        },
    },
    "properties": {
        "order_id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "created_at": {"type": "string", "format": "date-time"},
        "status": {"enum": ["pending", "paid", "shipped", "delivered", "cancelled"]},
        "currency": {"enum": ["USD", "EUR", "GBP", "JPY"]},
        "customer": {"$ref": "#/$defs/Customer"},
        "shipping_address": {"$ref": "#/$defs/Address"},
        "billing_address": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]},
        "items": {"type": "array", "items": {"$ref": "#/$defs/LineItem"}, "minItems": 1},
        "subtotal": {"type": "number"},
        "tax": {"type": "number", "minimum": 0},
        "shipping_cost": {"type": "number", "minimum": 0},
        "total": {"type": "number"},
        "discount": {"anyOf": [{"$ref": "#/$defs/PercentDiscount"}, {"$ref": "#/$defs/FixedDiscount"},
                               {"type": "null"}]},
        "payment": {"anyOf": [{"$ref": "#/$defs/Card"}, {"$ref": "#/$defs/Bank"}]},
        "notes": {"anyOf": [{"type": "string", "maxLength": 500}, {"type": "null"}]},
        "gift": {"type": "boolean"},
        "gift_message": _NULLABLE_STR,
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10},
        "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
        "tracking": {"anyOf": [{"$ref": "#/$defs/Tracking"}, {"type": "null"}]},
        "loyalty_points": {"type": "integer", "minimum": 0},
        "coupon_codes": {"type": "array", "items": {"type": "string", "pattern": "^[A-Z0-9]{4,12}$"}},
        "channel": {"enum": ["web", "mobile", "store", "phone"]},
        "estimated_delivery": {"type": "string", "format": "date"},
        "is_test": {"type": "boolean"},
        "warehouse": {"type": "string"},
        "returns_allowed": {"type": "boolean"},
        "language": {"type": "string", "pattern": "^[a-z]{2}$"},
        "weight_kg": {"type": "number", "exclusiveMinimum": 0},
        "referral": {"anyOf": [{"type": "string", "format": "uri"}, {"type": "null"}]},
        "version": {"type": "integer", "const": 2},
    },
    "required": ["order_id", "created_at", "status", "currency", "customer", "shipping_address", "items",
                 "subtotal", "tax", "shipping_cost", "total", "payment", "priority", "channel", "version"],
}

LARGE_INSTANCE = {
    "order_id": "ORD-004217",
    "created_at": "2026-11-30T14:05:09Z",
    "status": "paid",
    "currency": "EUR",
    "customer": {"id": 9182, "name": "Grace Hopper", "email": "grace@example.org", "phone": "+4915112345678",
                 "vip": True, "since": "2019-04-01"},
    "shipping_address": {"line1": "Hauptstrasse 5", "line2": None, "city": "Berlin", "region": "Berlin",
                         "postal_code": "10115", "country": "DE"},
    "billing_address": None,
    "items": [
        {"sku": "BOK-0042", "name": "The Art of Computer Programming, Vol. 1", "category": "books", "quantity": 1,
         "unit_price": 69.9, "options": [{"name": "cover", "value": "hardcover"}]},
        {"sku": "ELE-1290", "name": "USB-C cable 2 m", "category": "electronics", "quantity": 3, "unit_price": 9.5,
         "options": []},
    ],
    "subtotal": 98.4,
    "tax": 18.7,
    "shipping_cost": 4.99,
    "total": 112.09,
    "discount": {"kind": "percent", "percent": 10},
    "payment": {"method": "card", "brand": "visa", "last4": "4242", "exp_month": 7, "exp_year": 2029},
    "notes": "Leave at the door, please.",
    "gift": False,
    "gift_message": None,
    "priority": 2,
    "tags": ["first-order", "newsletter"],
    "metadata": {"campaign": "winter-sale", "ab_bucket": "B"},
    "tracking": {"carrier": "dhl", "number": "JD014600006281234567", "url": "https://www.dhl.com/track?id=JD0146"},
    "loyalty_points": 98,
    "coupon_codes": ["WINTER10"],
    "channel": "web",
    "estimated_delivery": "2026-12-04",
    "is_test": False,
    "warehouse": "BER-2",
    "returns_allowed": True,
    "language": "de",
    "weight_kg": 1.35,
    "referral": None,
    "version": 2,
}

JSON_OBJECT_INSTANCE = {"answer": "Paris", "confidence": 0.93, "sources": ["wikipedia", "atlas"],
                        "details": {"country": "France", "population": 2102650, "capital": True}}

REGEX = r"[A-Z][a-z]+ [A-Z][a-z]+, born (19|20)[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9] in [A-Z][a-zA-Z ]+\."
REGEX_INSTANCE = "Grace Hopper, born 1906-12-09 in New York City."

CHOICES = ["Afghanistan", "Albania", "Algeria", "Andorra", "Angola", "Argentina", "Armenia", "Australia",
           "Austria", "Azerbaijan", "Bahamas", "Bahrain", "Bangladesh", "Barbados", "Belarus", "Belgium",
           "Belize", "Benin", "Bhutan", "Bolivia", "Bosnia and Herzegovina", "Botswana", "Brazil", "Brunei",
           "Bulgaria", "Burkina Faso", "Burundi", "United Kingdom", "United States of America", "Uruguay"]
CHOICE_INSTANCE = "United States of America"

# A small Lark grammar (arithmetic over integers), the shape vLLM's `grammar` field takes.
LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")" | "-" factor
NUMBER: /[0-9]+/
"""
LARK_INSTANCE = "(12+7)*3-4/(2+-1)"

# (name, schema, valid instance, invalid instance). An invalid instance differs from the valid one
# only in what the feature forbids.
COVERAGE = [
    ("type list [string, null]", {"type": ["string", "null"]}, None, 1),
    ("enum", {"enum": ["red", "green", 3]}, 3, "blue"),
    ("const", {"const": "fixed"}, "fixed", "other"),
    ("$ref to $defs", {"$defs": {"P": {"type": "integer"}}, "type": "object",
                       "properties": {"a": {"$ref": "#/$defs/P"}}, "required": ["a"]}, {"a": 1}, {"a": "x"}),
    ("recursive $ref", {"$defs": {"N": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/N"}}}, "required": ["v"]}},
        "$ref": "#/$defs/N"}, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]}, {"v": 1, "kids": [{"kids": []}]}),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "a", [1]),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "a"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
     {"a": 1}, {"b": 1}),
    ("not", {"type": "integer", "not": {"const": 3}}, 4, 3),
    ("if/then/else", {"type": "string", "if": {"minLength": 3}, "then": {"pattern": "^a"}}, "abc", "bcd"),
    ("pattern", {"type": "string", "pattern": "^[a-c]+$"}, "abc", "abd"),
    ("format date-time", {"type": "string", "format": "date-time"}, "2026-01-02T03:04:05Z", "yesterday"),
    ("format date", {"type": "string", "format": "date"}, "2026-01-02", "2026-13-45x"),
    ("format email", {"type": "string", "format": "email"}, "a@b.org", "not an email"),
    ("format uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "123"),
    ("format uri", {"type": "string", "format": "uri"}, "https://x.org/a?b=1", "no uri"),
    ("format ipv4", {"type": "string", "format": "ipv4"}, "10.0.0.1", "10.0.0.999"),
    ("minLength/maxLength", {"type": "string", "minLength": 2, "maxLength": 3}, "abc", "abcd"),
    ("integer minimum/maximum", {"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    ("number exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, 0),
    ("multipleOf", {"type": "integer", "multipleOf": 5}, 15, 16),
    ("minItems/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2},
     [1, 2], [1, 2, 3]),
    ("uniqueItems", {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    ("prefixItems", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
     [1, "a"], [1, 2]),
    ("contains", {"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}}, [1, 7], [1, 2]),
    ("additionalProperties: false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                     "additionalProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    ("additionalProperties absent (extra keys valid)", {"type": "object", "properties": {"a": {"type": "integer"}}},
     {"a": 1, "b": "x"}, {"a": "x"}),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     {"x": 1}, {"x": "y"}),
    ("optional property omitted", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                                   "required": ["b"]}, {"b": "x"}, {"a": 1}),
    ("patternProperties", {"type": "object", "patternProperties": {"^n_": {"type": "integer"}},
                           "additionalProperties": False}, {"n_a": 1}, {"n_a": "x"}),
    ("propertyNames", {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, {"ab": 1}, {"AB": 1}),
    ("minProperties/maxProperties", {"type": "object", "minProperties": 1, "maxProperties": 2}, {"a": 1}, {}),
    ("dependentRequired", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                           "dependentRequired": {"a": ["b"]}}, {"a": 1, "b": 2}, {"a": 1}),
    ("unevaluatedProperties: false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                      "unevaluatedProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    ("external $ref (URL)", {"$ref": "https://example.com/schemas/thing.json"}, {}, 1),
    ("annotations (title, description, default, examples)",
     {"type": "object", "title": "T", "description": "d", "properties": {"a": {"type": "integer", "default": 1,
                                                                              "examples": [1]}}}, {"a": 1}, {"a": "x"}),
]
