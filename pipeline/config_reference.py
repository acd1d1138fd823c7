"""The config reference, generated from the pydantic models of ``pipeline.config``.

Every setting is declared once, with its type, constraints, default and
``Field(description=...)``; this module walks ``RunConfig`` and its nested models and
renders one row per key, so the README's table, ``entropy-pipeline config
--reference`` and the option list of ``--help`` cannot drift from the code.

Regenerate the README's table (between its ``config-reference`` markers) with::

    python -m pipeline.config_reference README.md        # or: make docs

and check it without writing with ``--check`` (exit status 1 when stale).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import types
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipeline.config import RunConfig

START_MARKER = "<!-- config-reference:start -->"
END_MARKER = "<!-- config-reference:end -->"
# Written under the start marker so that nobody edits the generated table by hand.
_GENERATED_NOTE = (
    "<!-- Generated from the Field descriptions in pipeline/config.py by "
    "`make docs` (python -m pipeline.config_reference README.md); do not edit. -->"
)
# Constraint attributes of annotated_types / pydantic metadata and how they read.
_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
_SCALAR_NAMES = {bool: "bool", int: "int", float: "float", str: "str", Path: "path"}


@dataclass(frozen=True)
class ReferenceRow:
    """One setting: its dotted key, readable type, YAML default and description."""

    key: str
    type: str
    default: str
    description: str


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _strip_annotated(annotation: Any) -> tuple[Any, list[Any]]:
    """The bare type and the constraint objects of ``Annotated[T, ...]`` (nested too)."""
    constraints: list[Any] = []
    while get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            constraints += item.metadata if isinstance(item, FieldInfo) else [item]
    return annotation, constraints


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds directly (one, or a union of several)."""
    annotation, _ = _strip_annotated(annotation)
    members = get_args(annotation) if _is_union(annotation) else (annotation,)
    found = []
    for member in members:
        member, _ = _strip_annotated(member)
        if isinstance(member, type) and issubclass(member, BaseModel):
            found.append(member)
    return found


def _bounds(constraints: Iterable[Any]) -> str:
    parts = []
    for constraint in constraints:
        for attribute, symbol in _BOUNDS:
            value = getattr(constraint, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def type_name(annotation: Any, constraints: Iterable[Any] = ()) -> str:
    """A readable type: ``int > 0``, ``path or null``, ```sequence` or `per_token```."""
    annotation, inner = _strip_annotated(annotation)
    constraints = [*constraints, *inner]
    bounds = _bounds(constraints)
    min_lengths = [c.min_length for c in constraints if getattr(c, "min_length", None)]
    origin = get_origin(annotation)
    if annotation is type(None):
        name = "null"
    elif _is_union(annotation):
        members = get_args(annotation)
        # null last: "int > 0 or null" reads as "a number, or leave it out".
        ordered = sorted(members, key=lambda member: member is type(None))
        name = " or ".join(type_name(member) for member in ordered)
    elif origin is Literal:
        choices = [f"`{value}`" for value in get_args(annotation)]
        name = " or ".join([", ".join(choices[:-1]), choices[-1]] if len(choices) > 2 else choices)
    elif origin is list:
        (item,) = get_args(annotation)
        name = f"list of {type_name(item)}"
        if min_lengths:
            name = (
                f"non-empty {name}" if min_lengths[0] == 1 else f"{name}, ≥ {min_lengths[0]} items"
            )
    elif origin is dict:
        _, value = get_args(annotation)
        name = f"mapping of name to {type_name(value)}"
    elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
        name = "section"
    else:
        name = _SCALAR_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))
    return f"{name} {bounds}" if bounds else name


def default_text(field: FieldInfo) -> str:
    """The default as a YAML value (``required`` when there is none)."""
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, Path):
        value = str(value)
    text = value if isinstance(value, str) else json.dumps(value)
    return f"`{text}`"


def _describe(field: FieldInfo, qualifier: str) -> str:
    text = " ".join((field.description or "").split())
    return f"{qualifier}{text}" if qualifier else text


def _discriminator(model: type[BaseModel]) -> str:
    """Label of a union member, to tell apart keys that differ between members.

    Its single-valued Literal fields (``kind: lora``), else the ``title`` of its
    ``model_config``, else its class name.
    """
    labels = []
    for name, field in model.model_fields.items():
        annotation, _ = _strip_annotated(field.annotation)
        if get_origin(annotation) is Literal and len(get_args(annotation)) == 1:
            labels.append(f"{field.alias or name}: {get_args(annotation)[0]}")
    return ", ".join(labels) or model.model_config.get("title") or model.__name__


def reference_rows(
    model: type[BaseModel] = RunConfig, prefix: str = "", qualifier: str = ""
) -> list[ReferenceRow]:
    """One row per setting of ``model``, nested sections flattened to dotted keys.

    A field holding a section gets a row with the section's docstring, followed by the
    section's own rows; a mapping of
    sections (``models``) gets a row of its own and rows keyed ``models.<name>.*``;
    the members of a union of sections each contribute their rows, labelled with the
    member's discriminating ``Literal`` field (``(kind: lora)``) where keys differ.
    """
    rows: list[ReferenceRow] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"  # what a config file writes
        annotation, _ = _strip_annotated(field.annotation)
        if get_origin(annotation) is dict and _models_in(get_args(annotation)[1]):
            value_type = get_args(annotation)[1]
            rows.append(
                ReferenceRow(
                    key,
                    "mapping of name to section",
                    default_text(field),
                    _describe(field, qualifier),
                )
            )
            rows += _union_rows(_models_in(value_type), f"{key}.<name>.", qualifier)
            continue
        sections = _models_in(annotation)
        if sections:
            # The section's docstring heads its rows: it says what the section is for.
            about = field.description or " ".join(
                " ".join((section.__doc__ or "").split()) for section in sections
            )
            nullable = _is_union(annotation) and type(None) in get_args(annotation)
            kind = "section or null" if nullable else "section"
            default = default_text(field) if field.is_required() or nullable else ""
            rows.append(ReferenceRow(key, kind, default, f"{qualifier}{about}"))
            rows += _union_rows(sections, f"{key}.", qualifier)
            continue
        rows.append(
            ReferenceRow(
                key,
                type_name(field.annotation, field.metadata),
                default_text(field),
                _describe(field, qualifier),
            )
        )
    return rows


def _union_rows(members: list[type[BaseModel]], prefix: str, qualifier: str) -> list[ReferenceRow]:
    """Rows of one section, or of each member of a union of sections, merged by key.

    A setting that several members declare alike is listed once, labelled with those
    members (no label when every member has it), where it first appears.
    """
    if len(members) == 1:
        return reference_rows(members[0], prefix, qualifier)
    labels: dict[ReferenceRow, list[str]] = {}
    for member in members:
        for row in reference_rows(member, prefix):
            labels.setdefault(row, []).append(_discriminator(member))
    merged = []
    for row, owners in labels.items():
        label = "" if len(owners) == len(members) else f"({', '.join(owners)}) "
        merged.append(replace(row, description=f"{qualifier}{label}{row.description}"))
    return merged


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference_table(rows: list[ReferenceRow] | None = None) -> str:
    """The reference as a Markdown table (key, type, default, meaning)."""
    rows = reference_rows() if rows is None else rows
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [
        f"| `{row.key}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(row.description)} |"
        for row in rows
    ]
    return "\n".join(lines) + "\n"


def options_help(sections: Iterable[str] | None = None, width: int = 100) -> str:
    """Plain-text list of settings for ``--help``: key, type, default, then meaning.

    ``sections`` keeps only the keys under those top-level names (all when None).
    """
    wanted = tuple(sections) if sections is not None else None
    blocks = []
    for row in reference_rows():
        if wanted is not None and row.key.split(".")[0] not in wanted:
            continue
        default = f"; default {row.default.strip('`')}" if row.default else ""
        head = f"  {row.key}  ({row.type.replace('`', '')}{default})"
        body = textwrap.fill(
            row.description, width, initial_indent="      ", subsequent_indent="      "
        )
        blocks.append(f"{head}\n{body}")
    return "\n".join(blocks)


def replace_generated(document: str, table: str) -> str:
    """``document`` with the text between the reference markers replaced by ``table``."""
    start, end = document.find(START_MARKER), document.find(END_MARKER)
    if start < 0 or end < start:
        raise ValueError(
            f"the document has no {START_MARKER} ... {END_MARKER} block to fill; add the "
            "two markers where the config reference belongs."
        )
    head = document[: start + len(START_MARKER)]
    return f"{head}\n{_GENERATED_NOTE}\n\n{table}\n{document[end:]}"


def main(argv: list[str] | None = None) -> int:
    """Rewrite (or with ``--check``, verify) the reference block of a Markdown file."""
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.config_reference",
        description="Regenerate the config reference table between the "
        f"{START_MARKER} and {END_MARKER} markers of a Markdown file.",
    )
    parser.add_argument("document", type=Path, help="Markdown file, e.g. README.md")
    parser.add_argument(
        "--check", action="store_true", help="only report whether the table is current"
    )
    args = parser.parse_args(argv)
    current = args.document.read_text()
    updated = replace_generated(current, reference_table())
    if args.check:
        if updated != current:
            print(f"{args.document}: config reference is stale; run `make docs`.", file=sys.stderr)
            return 1
        return 0
    if updated != current:
        args.document.write_text(updated)
        print(f"{args.document}: config reference updated.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
