"""Print the README's settings tables from the settings models themselves (and check them).

    python scripts/settings_tables.py          # the tables, as Markdown
    python scripts/settings_tables.py --check  # exit 1 when README.md's tables differ from the models
    python scripts/settings_tables.py --write  # rewrite README.md's tables from the models

Each table sits in README.md between ``<!-- settings: module:Model -->`` and ``<!-- /settings -->``.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

from loops_core.settings import env_names

MODELS = [
    "loops_core.settings:ClientSettings",
    "loops_core.server.requests:Limits",
    "loops_backends.local_gpu.backend:LocalSettings",
    "loops_backends.modal.settings:ModalSettings",
    "loops_backends.baseten.backend:BasetenSettings",
]
README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"<!-- settings: (\S+) -->\n(.*?)<!-- /settings -->", re.S)


def _model(target: str):  # noqa: ANN202
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def table(target: str) -> str:
    model = _model(target)
    rows = ["| option | environment | default | meaning |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        default = "required" if field.is_required() else f"`{field.default!r}`"
        meaning = (field.description or "").replace("|", "\\|")
        envs = ", ".join(f"`{e}`" for e in env_names(model, name))
        rows.append(f"| `{name}` | {envs} | {default} | {meaning} |")
    return "\n".join(rows) + "\n"


def readme_tables() -> dict[str, str]:
    return {m.group(1): m.group(2) for m in BLOCK.finditer(README.read_text())}


def main() -> int:
    if "--write" in sys.argv:
        README.write_text(BLOCK.sub(lambda m: f"<!-- settings: {m.group(1)} -->\n{table(m.group(1))}<!-- /settings -->",
                                    README.read_text()))
        return 0
    if "--check" in sys.argv:
        found = readme_tables()
        bad = [t for t in MODELS if found.get(t) != table(t)]
        for t in bad:
            print(f"README.md: the settings table of {t} differs from the model (run scripts/settings_tables.py)")
        return 1 if bad else 0
    for t in MODELS:
        print(f"<!-- settings: {t} -->\n{table(t)}<!-- /settings -->\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
