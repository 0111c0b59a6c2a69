"""The configuration reference, docs/config-reference.md, generated from the config dataclasses.

    distgan config-reference                                          # print the page
    distgan config-reference --out docs/config-reference.md           # write it (what `make docs` runs)
    distgan config-reference --out docs/config-reference.md --check   # exit 1 when the file is stale

One section per config section: the part of a key before its last dot, so `model.dcgan.g_width` belongs to the
sub-section `model.dcgan` under `model`. Each section has a table (key, type, default, meaning) built from
`distgan.config.field_index()`, and the docstring of the section's dataclass, when it has one, as its intro.
tests/unit/test_config_reference.py fails when the checked-in page differs from `render()`. Like distgan/config.py
this imports no torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal

from distgan import config

DEFAULT_PATH = "docs/config-reference.md"
COMMAND = f"`make docs` (= distgan config-reference --out {DEFAULT_PATH})"


def render() -> str:
    """The page: a title, how to read it, then one section per config section, parents before their sub-sections."""
    index = config.field_index()
    rows: dict[str, list[str]] = {}
    for key in index:
        rows.setdefault(key.rpartition(".")[0], []).append(key)
    children: dict[str, list[str]] = {}
    for section in rows:  # every section and the sections above it, in the order their keys first appear
        parts = section.split(".") if section else []
        for depth in range(len(parts)):
            parent, child = ".".join(parts[:depth]), ".".join(parts[: depth + 1])
            siblings = children.setdefault(parent, [])
            if child not in siblings:
                siblings.append(child)
    classes, families = _section_classes()

    sections = ", ".join(f"[`{s}`](#{_slug(s)})" for s in _walk("", children) if s)
    out = [
        "# Configuration reference",
        "",
        "Every config key with its type, default and meaning, one table per section. Set a key in a YAML file "
        "under its section, or on the command line as `section.key=value`; "
        "[configuration.md](configuration.md) explains how configs work. This page is generated from the "
        "dataclasses in `distgan/config.py` and `distgan/models/__init__.py` by "
        f"`distgan config-reference --out {DEFAULT_PATH}` (`make docs`); do not edit it by hand (a test fails "
        "when it is stale). `distgan train --help-config` prints the same keys in a terminal.",
        "",
        f"{len(index)} keys. Sections: [top level](#top-level), {sections}.",
    ]
    for section in _walk("", children):
        depth = section.count(".") + 1 if section else 1
        out += ["", "#" * (depth + 1) + " " + (f"`{section}`" if section else "Top level"), ""]
        intro = _intro(classes.get(section), families.get(section))
        if intro:
            out += [intro, ""]
        keys = rows.get(section, [])
        if keys:
            out += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
            for key in keys:
                info = index[key]
                cells = [f"`{key}`", _type_cell(info.type), _default_cell(info.default), _cell(info.doc)]
                out.append("| " + " | ".join(cells) + " |")
        else:
            out.append("(no keys of its own: see its sub-sections)")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="distgan config-reference",
        description="Print or write the configuration reference page (Markdown), generated from the config "
        "dataclasses.",
    )
    p.add_argument("--out", metavar="PATH", help=f"write the page to PATH (`make docs` writes {DEFAULT_PATH})")
    p.add_argument(
        "--check",
        action="store_true",
        help=f"write nothing; exit 1 if PATH (default {DEFAULT_PATH}) differs from what would be written",
    )
    args = p.parse_args(argv)
    page = render()
    if args.check:
        path = Path(args.out or DEFAULT_PATH)
        try:
            current = path.read_text()
        except OSError:
            current = None
        if current != page:
            state = "is missing" if current is None else "is stale (the config dataclasses changed)"
            print(f"distgan: error: {path} {state}; run {COMMAND}", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    if args.out is None:
        sys.stdout.write(page)
        return 0
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    print(f"wrote {path} ({len(config.field_index())} keys)")
    return 0


# ---------------------------------------------------------------------- helpers


def _walk(section: str, children: dict[str, list[str]]) -> list[str]:
    """`section`, then its sub-sections depth first (the top level, "", holds the keys without a dot)."""
    out = [section]
    for child in children.get(section, []):
        out += _walk(child, children)
    return out


def _section_classes() -> tuple[dict[str, type], dict[str, Any]]:
    """The dataclass behind each section ("" for Config itself), and the model family behind a family section."""
    from distgan import models

    families = getattr(models, "FAMILIES", {})
    classes: dict[str, type] = {}
    fams: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        classes[prefix.rstrip(".")] = cls
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an unresolvable annotation costs the intros below it, never the page
            return
        for f in dataclasses.fields(cls):
            if f.metadata.get("family_section"):  # model.<family>.*: each family's options dataclass
                for name, fam in families.items():
                    fams[prefix + name] = fam
                    if dataclasses.is_dataclass(getattr(fam, "options", None)):
                        walk(fam.options, f"{prefix}{name}.")
            elif isinstance(hints.get(f.name), type) and dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name], f"{prefix}{f.name}.")

    walk(config.Config, "")
    return classes, fams


def _intro(cls: type | None, family: Any) -> str:
    """The section's dataclass docstring (not the signature dataclass() writes when there is none), and for a
    model family what it makes."""
    parts = []
    doc = inspect.cleandoc(cls.__doc__ or "") if cls is not None else ""
    if doc and not doc.startswith(cls.__name__ + "("):
        parts += [_prose(" ".join(paragraph.split())) for paragraph in doc.split("\n\n")]
    elif family is not None and getattr(family, "doc", ""):
        parts.append(_prose(family.doc.rstrip(".") + "."))
    if family is not None:
        facts = [f"`model.family={family.name}`"]
        if getattr(family, "resolutions", None):
            facts.append("resolutions " + ", ".join(map(str, family.resolutions)))
        if hasattr(family, "conditional"):
            facts.append("class-conditional: " + ("yes" if family.conditional else "no"))
        parts.append("Used with " + "; ".join(facts) + ".")
    return "\n\n".join(parts)


def _type_cell(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp)]
        return " or ".join("`null`" if a is type(None) else _type_cell(a) for a in args)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(tp))
    return _cell(f"`{config._type_name(tp)}`")


def _default_cell(value: Any) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif value is None:
        text = "null"
    elif isinstance(value, str):
        text = value if value else '""'
    else:
        text = repr(value)
    return _cell(f"`{text}`")


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell, shown as written."""
    return _prose(" ".join(str(text).split())).replace("|", "\\|")


def _prose(text: str) -> str:
    """Doc text shown as written: outside `code`, a <word> is no HTML tag, and * or __ (__init__) no emphasis."""
    parts = text.split("`")
    for i in range(0, len(parts), 2):  # the even parts are outside code spans
        parts[i] = parts[i].replace("<", "&lt;").replace("*", "\\*").replace("__", "\\_\\_")
    return "`".join(parts)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to -."""
    text = heading.strip().lower()
    return "".join(c for c in text if c.isalnum() or c in "-_ ").replace(" ", "-")


if __name__ == "__main__":
    sys.exit(main())
