"""Every configuration key with its default, its choices and what it does, read from the dataclasses
of trainer/config.py and the comments beside their fields.

    python -m trainer.config_reference > CONFIG.md

tests/test_config.py regenerates it and fails when CONFIG.md no longer matches the code.
"""

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize

import yaml

from .config import CHOICES, RunConfig

HEADER = """# Configuration keys

Every key a run configuration takes, generated from `trainer/config.py` by
`python -m trainer.config_reference > CONFIG.md` (a test fails when this file and the code
differ). A key is written `section.key` in YAML sections or on the command line; `stages.<stage>`
in a file adds to these for one stage (see the README).
"""


def field_comments(cls):
    """{field name: comment}: the comment lines right above a field, then the one on its line."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
    found = {}
    for node in ast.parse(source).body[0].body:
        if not isinstance(node, ast.AnnAssign):
            continue
        above, line = [], node.lineno - 1
        while line in comments and lines[line - 1].lstrip().startswith("#"):
            above.insert(0, comments[line][1])
            line -= 1
        inline = [comments[node.lineno][1]] if node.lineno in comments else []
        found[node.target.id] = " ".join(above + inline)
    return found


def format_default(value):
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, dict)):
        return "`" + yaml.safe_dump(value, default_flow_style=True, sort_keys=False).strip() + "`"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"{value:g}" if isinstance(value, float) else str(value)


def default_of(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def sections(cls=RunConfig, prefix=""):
    """[(section name, [(key, field)])]: the fields of cls and, recursively, of its nested sections."""
    plain, nested = [], []
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        if isinstance(field.default_factory, type) and dataclasses.is_dataclass(field.default_factory):
            nested += sections(field.default_factory, f"{key}.")
        else:
            plain.append((key, field, cls))
    name = prefix.rstrip(".") or "run"
    return ([(name, plain)] if plain else []) + nested


def reference():
    """The Markdown of CONFIG.md."""
    parts = [HEADER]
    for section, fields in sections():
        parts.append(f"## {section}\n\n| key | default | choices | meaning |\n|---|---|---|---|")
        comments = {}
        for key, field, owner in fields:
            if owner not in comments:
                comments[owner] = field_comments(owner)
            choices = ", ".join(f"`{choice}`" for choice in CHOICES.get(key, ()))
            meaning = comments[owner].get(field.name, "").replace("|", "\\|")
            parts[-1] += f"\n| `{key}` | {format_default(default_of(field))} | {choices} | {meaning} |"
        parts[-1] += "\n"
    return "\n".join(parts)


def main():
    print(reference(), end="")


if __name__ == "__main__":
    main()
