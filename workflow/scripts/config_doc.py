"""config/README.md from the config schema: every key, its type, default and meaning.

    python workflow/scripts/config_doc.py            # rewrite config/README.md
    python workflow/scripts/config_doc.py --check    # exit 1 if config/README.md is stale (the tests run this)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
OUTPUT = REPO / "config" / "README.md"

INTRO = """# Configuration keys

Every key the workflow reads, generated from `workflow/schemas/config.schema.yaml` (run
`python workflow/scripts/config_doc.py` after changing the schema; the tests fail while this file is
stale). The workflow validates a config against that schema before any job starts, and fills in the
defaults below. `<arch>` and `<task>` stand for the names you choose under `archs` and `tasks`.

Configs here: `config.yaml` (the embedded offline demo, the default), `quantizers.yaml` (layered on
the default: four quantizers side by side), `paper.yaml` (the paper's 22-task grid on four ViTs as
the authors' code trains it: what the published tables come from), `paper-text.yaml` (the same grid
under the protocol the paper's text states); `.test/config/config.yaml` is the miniature the tests run.

| key | type | default | meaning |
|---|---|---|---|
"""


def _resolve(node: dict, schema: dict) -> dict:
    """A node with its ``$ref`` followed; the referring node's own keys (e.g. description) win, and its
    ``properties`` (e.g. the defaults the widest train sections fill in) are merged key by key."""
    if "$ref" not in node:
        return node
    target = schema
    for part in node["$ref"].lstrip("#/").split("/"):
        target = target[part]
    own = {k: v for k, v in node.items() if k != "$ref"}
    merged = {**target, **own}
    if "properties" in own and "properties" in target:
        merged["properties"] = {name: {**child, **own["properties"].get(name, {})}
                                for name, child in target["properties"].items()}
    return merged


def _type(node: dict) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kind = node.get("type", "")
    kinds = kind if isinstance(kind, list) else [kind]
    if "array" in kinds and "items" in node:
        return f"list of {node['items'].get('type', 'value')}"
    return " or ".join(str(k) for k in kinds if k)


def _default(node: dict) -> str:
    if "default" not in node:
        return ""
    return "`" + json.dumps(node["default"]).replace("|", "\\|") + "`"


def rows(node: dict, schema: dict, prefix: str) -> list[str]:
    node = _resolve(node, schema)
    meaning = " ".join(str(node.get("description", "")).split()).replace("|", "\\|")
    out = [f"| `{prefix}` | {_type(node)} | {_default(node)} | {meaning} |"] if prefix else []
    for option in node.get("oneOf", []):  # e.g. quant: one quantizer or a list of them; document the quantizer once
        option = _resolve(option, schema)
        if option.get("properties"):
            for name, child in option["properties"].items():
                out += rows(child, schema, f"{prefix}.{name}")
    for name, child in node.get("properties", {}).items():
        out += rows(child, schema, f"{prefix}.{name}" if prefix else name)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and (extra.get("properties") or "$ref" in extra):
        entry = {"archs": "<arch>", "tasks": "<task>"}.get(prefix, "<name>")  # what the user names the entry
        out += rows(extra, schema, f"{prefix}.{entry}")
    return out


def render() -> str:
    schema = yaml.safe_load(SCHEMA.read_text())
    return INTRO + "\n".join(rows(schema, schema, "")) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that config/README.md is up to date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.exists() or OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python workflow/scripts/config_doc.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
