"""Request fields, declared once (`Field`: type, default, range, description)
and read with clear 400s (`Fields`): the HTTP API's parser and OpenAPI schema,
and the client library's reading of pipeline steps, come from the same
declarations."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import quoted
from .failures import bad

_SCALARS = {"string": "string", "integer": "integer", "number": "number", "boolean": "boolean"}
TRUE, FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


def load_json(text: str | bytes, what: str) -> Any:
    """Parse JSON from a client: a 400 for anything that is not (nesting too deep included)."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise bad(f"{what} is not valid JSON") from None
    except RecursionError:
        raise bad(f"{what} is nested too deeply") from None


class Fields:
    """Typed reads of request fields; `where` prefixes messages. A form's values are
    text ("4", "true"); a JSON body's carry their own types, which must be right."""

    def __init__(self, values: dict[str, Any], where: str = "", *, form: bool = False):
        self.values, self.where, self.form = values, where, form

    def _name(self, name: str) -> str:
        return f"{self.where}{name}"

    def _get(self, name: str) -> Any:
        """The given value; None when absent. JSON's null is not a value of any field."""
        value = self.values.get(name)
        if value is None and name in self.values:
            raise bad(f"{self._name(name)} must not be null; leave it out for its default")
        return value

    def text(
        self, name: str, default: str, choices: tuple[str, ...] | None = None, aliases: dict[str, str] | None = None
    ) -> str:
        value = self._get(name)
        if value is None or value == "":
            return default
        if not isinstance(value, str):
            raise bad(f"{self._name(name)} must be a string")
        value = value.strip()
        value = (aliases or {}).get(value.lower(), value)
        if choices is not None:
            if value.lower() not in choices:
                raise bad(f"{self._name(name)} must be one of {', '.join(choices)}; got {quoted(value)}")
            return value.lower()
        return value

    def number(
        self,
        name: str,
        default: float,
        *,
        integer: bool = False,
        minimum: float | None = None,
        maximum: float | None = None,
        also: tuple[float, ...] = (),
    ) -> float:
        value = self._get(name)
        if value is None or value == "":
            return default
        kind = "an integer" if integer else "a number"
        if isinstance(value, bool) or isinstance(value, str) and not self.form:
            raise bad(f"{self._name(name)} must be {kind}; got {quoted(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            raise bad(f"{self._name(name)} must be {kind}; got {quoted(value)}") from None
        if not math.isfinite(number) or (integer and not number.is_integer()):
            raise bad(f"{self._name(name)} must be {kind}; got {quoted(value)}")
        if number not in also and (
            minimum is not None and number < minimum or maximum is not None and number > maximum
        ):
            bounds = " and ".join(
                text
                for text in (
                    minimum is not None and f"at least {minimum:g}",
                    maximum is not None and f"at most {maximum:g}",
                )
                if text
            )
            alternatives = "".join(f"{v:g} or " for v in also)
            raise bad(f"{self._name(name)} must be {alternatives}{bounds}; got {value}")
        return int(number) if integer else number

    def boolean(self, name: str, default: bool = False) -> bool:
        value = self._get(name)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        if self.form and isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
            return value.strip().lower() in TRUE
        raise bad(f"{self._name(name)} must be true or false; got {quoted(value)}")

    def structured(self, name: str, default: Any = None) -> Any:
        """A JSON value: JSON text in a form field, the value itself in a JSON body."""
        value = self._get(name)
        if value is None or value == "" and self.form:  # absent, or an empty form field: none given
            return default
        if isinstance(value, str) and self.form:
            return load_json(value, self._name(name))
        return value

    def names(self, name: str) -> list[str]:
        """A list of names: a JSON list, or comma-separated."""
        value = self._get(name)
        if value is None or value == "":
            return []
        if isinstance(value, str) and value.strip().startswith("["):
            value = self.structured(name)
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise bad(f"{self._name(name)} must be a list of names")
        return value


@dataclass(frozen=True)
class Field:
    """One field. `kind`: string, integer, number, boolean, names (a comma-separated
    string or a JSON list of names) or json (a JSON value; in a form, as a JSON string)."""

    name: str
    kind: str
    description: str = ""
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    also: tuple[float, ...] = ()  # values allowed outside [minimum, maximum] (0: automatic)
    choices: tuple[str, ...] = ()
    aliases: tuple[tuple[str, str], ...] = ()
    value_schema: dict | None = None  # json: the schema of the JSON value

    def read(self, fields: Fields) -> Any:
        if self.kind == "string":
            return fields.text(
                self.name, self.default if self.default is not None else "", self.choices or None, dict(self.aliases)
            )
        if self.kind in ("integer", "number"):
            return fields.number(
                self.name,
                self.default,
                integer=self.kind == "integer",
                minimum=self.minimum,
                maximum=self.maximum,
                also=self.also,
            )
        if self.kind == "boolean":
            return fields.boolean(self.name, bool(self.default))
        if self.kind == "names":
            return fields.names(self.name)
        return fields.structured(self.name, self.default)

    def schema(self, in_form: bool = False) -> dict:
        if self.kind == "json":  # in a form, the part is JSON text (image_body declares its encoding)
            return {**(self.value_schema or {}), "description": self.description}
        if self.kind == "boolean" and in_form:
            return {
                "type": "string",
                "enum": [*TRUE, *FALSE],
                "default": str(bool(self.default)).lower(),
                "description": self.description,
            }
        if self.kind == "names":  # each name as `value_schema` says
            name = {"type": "string", "minLength": 1, **(self.value_schema or {})}
            if in_form:  # one name (or several, comma-separated); an empty field means none
                return (
                    {"type": "string", "description": f"{self.description} (comma-separated)"}
                    if not self.value_schema
                    else {**name, "description": self.description}
                )
            return {"anyOf": [name, {"type": "array", "items": name, "minItems": 1}], "description": self.description}
        schema: dict[str, Any] = {"type": _SCALARS[self.kind], **(self.value_schema or {})}
        if self.choices:
            schema["enum"] = list(self.choices) + [alias for alias, _ in self.aliases]
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.also:
            schema = {"anyOf": [{"type": _SCALARS[self.kind], "enum": list(self.also)}, schema]}
        if self.default is not None:
            schema["default"] = self.default
        if self.description:
            schema["description"] = self.description
        return schema


def group(*fields: Field) -> dict[str, Field]:
    return {f.name: f for f in fields}


def read(fields: Fields, declared: dict[str, Field]) -> dict[str, Any]:
    """Every declared field's value, parsed and checked."""
    return {name: f.read(fields) for name, f in declared.items()}
