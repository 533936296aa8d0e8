"""MkDocs hook: render the event reference from the pydantic models.

A page names a model with a marker line, ``<!-- schema: ArtifactSavedEvent -->``,
and this hook replaces the marker with the model's fields and JSON schema, both
taken from ``model_json_schema(mode="serialization")`` when the site is built.
The reference therefore cannot drift from the code. ``<!-- schema: remaining -->``
renders every exported model that no other marker of the page names, so a new
model appears without an edit; a model rendered nowhere, or a marker naming an
unknown model, is a warning, which fails a strict build.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

import lamin_lightning_core as ll

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page
    from pydantic.fields import FieldInfo

log = logging.getLogger("mkdocs.hooks.lamin_lightning")

MARKER = re.compile(r"^<!-- schema: (?P<name>\w+) -->$", re.MULTILINE)
# Some docstrings use Sphinx roles (:class:`X`), which Markdown leaves as text.
SPHINX_ROLE = re.compile(r":(?:class|meth|func|attr|mod|data|exc|obj):(?=<code>)")
MODELS: dict[str, type[BaseModel]] = {
    name: value
    for name in ll.__all__
    if isinstance(value := getattr(ll, name), type) and issubclass(value, BaseModel)
}
REMAINING = "remaining"
"""Marker name: every exported model that no other marker on the page names."""
_rendered: set[str] = set()


def on_pre_build(config: MkDocsConfig) -> None:
    _rendered.clear()


def on_page_markdown(
    markdown: str, page: Page, config: MkDocsConfig, files: Files
) -> str:
    def render(match: re.Match[str]) -> str:
        name = match["name"]
        if name == REMAINING:
            return render_remaining(markdown)
        model = MODELS.get(name)
        if model is None:
            log.warning(
                "%s: <!-- schema: %s --> names no pydantic model exported by "
                "lamin_lightning_core; known: %s",
                page.file.src_uri,
                name,
                ", ".join(sorted(MODELS)),
            )
            return match[0]
        _rendered.add(name)
        return render_model(model)

    return MARKER.sub(render, markdown)


def on_page_content(html: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    return SPHINX_ROLE.sub("", html)


def on_post_build(config: MkDocsConfig) -> None:
    missing = sorted(set(MODELS) - _rendered)
    if missing:
        log.warning(
            "No page renders the schema of %s: add <!-- schema: <Name> --> lines "
            "to docs/reference/events.md",
            ", ".join(missing),
        )


def render_remaining(markdown: str) -> str:
    """A section per exported model that the page does not place itself."""
    placed = {match["name"] for match in MARKER.finditer(markdown)}
    parts = []
    for name in sorted(set(MODELS) - placed):
        _rendered.add(name)
        parts += [f"### {name}", "", render_model(MODELS[name])]
    return "\n".join(parts)


def render_model(model: type[BaseModel]) -> str:
    """Markdown for one model: summary, field table, Python-only fields, schema."""
    schema = model.model_json_schema(mode="serialization")
    parts = [_summary(model), "", *_field_table(schema, model)]
    python_only = [
        (name, field)
        for name, field in model.model_fields.items()
        if name not in schema.get("properties", {})
    ]
    if python_only:
        parts += ["", "Python only, never serialised:", ""]
        parts += [
            f"* `{name}`: {_text(field.description)}" for name, field in python_only
        ]
    for name, definition in schema.get("$defs", {}).items():
        parts += ["", f"`{name}`: {_text(definition.get('description'))}", ""]
        parts += _field_table(definition)
    parts += ["", '??? note "JSON schema"', "", "    ```json"]
    parts += [f"    {line}" for line in json.dumps(schema, indent=2).splitlines()]
    parts += ["    ```", ""]
    return "\n".join(parts)


def _summary(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    return doc.split("\n\n", 1)[0].replace("\n", " ")


def _field_table(
    schema: dict[str, Any], model: type[BaseModel] | None = None
) -> list[str]:
    required = set(schema.get("required", ()))
    fields = model.model_fields if model is not None else {}
    rows = ["| Field | Type | Default | Description |", "|---|---|---|---|"]
    for name, prop in schema.get("properties", {}).items():
        if name in required:
            default = "required"
        elif "default" in prop:
            default = f"`{json.dumps(prop['default'])}`"
        else:
            default = _factory_default(fields.get(name))
        rows.append(
            f"| `{name}` | {_type(prop)} | {default} | "
            f"{_text(prop.get('description'))} |"
        )
    return rows


def _type(prop: dict[str, Any]) -> str:
    if "$ref" in prop:
        return f"`{prop['$ref'].rsplit('/', 1)[-1]}`"
    if "const" in prop:
        return f"`{json.dumps(prop['const'])}`"
    if "enum" in prop:
        return " or ".join(f"`{json.dumps(value)}`" for value in prop["enum"])
    if "anyOf" in prop:
        return " or ".join(_type(option) for option in prop["anyOf"])
    kind = prop.get("type", "any")
    if kind == "array":
        return f"array of {_grouped(prop.get('items', {}))}"
    if kind == "object" and isinstance(prop.get("additionalProperties"), dict):
        return f"object of {_grouped(prop['additionalProperties'])}"
    if "format" in prop:
        return f"`{kind}` ({prop['format']})"
    return f"`{kind}`"


def _grouped(prop: dict[str, Any]) -> str:
    text = _type(prop)
    return f"({text})" if " or " in text else text


def _factory_default(field: FieldInfo | None) -> str:
    # A default_factory is absent from the schema: show empty containers, and
    # call anything else (a UUID, a timestamp) generated.
    factory = field.default_factory if field is not None else None
    if factory in (dict, list, tuple):
        return f"`{json.dumps(factory())}`"  # type: ignore[misc]
    return "generated"


def _text(description: str | None) -> str:
    if not description:
        return ""
    return " ".join(description.split()).replace("|", "\\|")
