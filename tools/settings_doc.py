"""docs/settings.md, generated from streamer/settings.py (the code is the source): every setting with its
environment variable, type, default and description. tests/unit/test_settings_doc.py fails when they differ.

    python -m tools.settings_doc          # rewrite docs/settings.md
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import SecretStr

from streamer.settings import TOOL_VARIABLES, setting_fields

OUT = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
GROUPS = {"": "Process", "kafka": "Kafka", "windows": "Windows", "model": "Model", "batching": "Batching",
          "episodes": "Episodes (alarm suppression)", "state": "Patient state"}
HEADER = """# Settings

Generated from `streamer/settings.py` by `python -m tools.settings_doc` (a test fails when they differ).

Sources, later wins: defaults < the TOML file (`STREAMER_CONFIG` or `--config`; sections `[kafka]`,
`[windows]`, `[model]`, `[batching]`, `[episodes]`, `[state]`) < `STREAMER_*` environment variables < command-line
options. A nested setting's variable joins the group with a double underscore. Unknown or invalid
settings, in a file or as a `STREAMER_*` variable, stop the process with exit 2 naming the setting (and,
for a mistyped variable, the nearest valid one). Lists and mappings in variables are JSON. Examples:
`configs/local.toml` (embedded broker), `configs/production.toml` (Apache Kafka, SASL_SSL).
"""


def _type(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if args and type(None) in args:
        return _type(next(a for a in args if a is not type(None)))
    if origin in (list, dict):
        return origin.__name__
    if annotation is SecretStr:
        return "secret"
    return getattr(annotation, "__name__", str(annotation))


def _default(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, str) and not value:
        return '`""`'
    return f"`{value}`".replace("|", "\\|")


def _group(dotted: str) -> str:
    return dotted.rpartition(".")[0]


def _rows(group: str) -> list[str]:
    rows = []
    for dotted, env, field in setting_fields():
        if _group(dotted) != group:
            continue
        text = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{dotted}` | `{env}` | {_type(field.annotation)} | {_default(field.default)} | {text} |")
    return rows


def render() -> str:
    out = [HEADER]
    for group, title in GROUPS.items():
        out += [f"## {title}", "", "| setting | variable | type | default | meaning |", "|---|---|---|---|---|",
                *_rows(group), ""]
    out += ["## Variables that are not settings", "", "| variable | meaning |", "|---|---|",
            *(f"| `{k}` | {v} |" for k, v in TOOL_VARIABLES.items()), ""]
    return "\n".join(out)


def undocumented() -> list[str]:
    return [dotted for dotted, _, field in setting_fields() if not field.description]


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT}")
    sys.exit(0)
