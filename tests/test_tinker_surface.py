"""The ``tinker`` shim matches tinker==0.38.0 type for type.

``scripts/tinker_surface_dump.py`` describes a ``tinker`` package (names, kinds, frozen-ness,
fields with types/defaults/required-ness, enum members, method signatures, exception
constructors, import paths). The real SDK's description is committed
(``tests/data/tinker_surface_0.38.0.json``, written by ``--real`` from a side venv), so this test
runs offline: it describes the shim imported here and diffs the two. Every difference must be in
``tests/data/tinker_surface_allowlist.txt`` with its reason, and every allowlist line must still
be needed. ``LOOPS_TEST_REAL_TINKER=1`` also rebuilds the real description and checks the
committed one is current.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"


def _dumper():
    spec = importlib.util.spec_from_file_location("tinker_surface_dump", ROOT / "scripts" / "tinker_surface_dump.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dump = _dumper()
REAL = json.loads(dump.REAL_JSON.read_text())


def allowlist() -> dict[str, str]:
    out = {}
    for line in (DATA / "tinker_surface_allowlist.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, reason = line.partition("  # ")
            assert reason.strip(), f"allowlist line without a reason: {line!r}"
            out[key.strip()] = reason.strip()
    return out


def test_the_shim_matches_the_real_sdk_apart_from_the_allowlist():
    allowed = allowlist()
    differences = dump.diff(REAL, dump.describe())
    keys = {line.split(": ", 1)[0] for line in differences}
    unexplained = [line for line in differences if line.split(": ", 1)[0] not in allowed]
    assert not unexplained, "differences from tinker 0.38 not in the allowlist:\n" + "\n".join(unexplained)
    stale = sorted(set(allowed) - keys)
    assert not stale, f"allowlist entries no longer needed (remove them): {stale}"


def test_the_description_covers_what_tinker_code_uses():
    types = REAL["modules"]["tinker.types"]
    assert len(types) == 152
    assert types["Datum"]["kind"] == "dataclass" and types["Datum"]["frozen"]
    assert types["ModelInput"]["kind"] == "pydantic" and types["ModelInput"]["frozen"]
    assert types["RequestErrorCategory"] == {"base": "StrEnum", "kind": "enum", "members": {
        "Server": "'server'", "Unknown": "'unknown'", "User": "'user'"}}
    assert REAL["modules"]["tinker"]["APIStatusError"]["init"] == "(self, message, response, body)"
    assert "tinker.types.tensor_data" in REAL["submodules"]
    assert "tinker.lib.public_interfaces.rest_client" in REAL["submodules"]


def test_the_diff_sees_each_kind_of_difference():
    ours = copy.deepcopy(REAL)
    t = ours["modules"]["tinker.types"]
    t["Datum"]["frozen"] = False
    t["SampleResponse"]["fields"].pop("prompt_cache_hit_tokens")
    t["AdamParams"]["fields"]["grad_clip_norm"]["default"] = "1.0"
    t["RequestErrorCategory"] = {"kind": "alias", "type": "Literal['server', 'unknown', 'user']"}
    t["Datum"]["members"]["model_dump"] = "method(self)"
    ours["submodules"]["tinker.types.tensor_data"] = []
    lines = dump.diff(REAL, ours)
    assert "tinker.types.Datum.frozen: true != false" in lines
    assert "tinker.types.SampleResponse.fields.prompt_cache_hit_tokens: missing" in lines
    assert "tinker.types.AdamParams.fields.grad_clip_norm.default: \"0.0\" != \"1.0\"" in lines
    assert "tinker.types.RequestErrorCategory: kind enum != alias" in lines
    assert "tinker.types.Datum.members.model_dump: extra" in lines
    assert "tinker.types.tensor_data.TensorData: missing from module" in lines
    assert len(lines) == 7  # tensor_data also held TensorDtype


@pytest.mark.skipif(os.environ.get("LOOPS_TEST_REAL_TINKER") != "1",
                    reason="set LOOPS_TEST_REAL_TINKER=1 to rebuild the real SDK's description (side venv, PyPI)")
def test_the_committed_description_is_the_real_sdks():
    assert dump.real_description() == REAL
