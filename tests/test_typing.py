"""The public API is typed: `mypy --strict` passes on a user-style program (examples/typed_usage.py),
and what it infers is the real type, not `Any` (the lazy names in `dsrs/__init__.py` resolve for type
checkers, and every `with_*` builder returns the LM's own class)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def mypy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_mypy_strict_passes_on_a_users_program() -> None:
    r = mypy("examples/typed_usage.py")
    assert r.returncode == 0, r.stdout + r.stderr


def test_what_a_type_checker_sees_is_the_real_type(tmp_path: Path) -> None:
    probes = {
        'LM("openai/gpt-4o-mini").with_max_tokens(1).with_cache(True)': "dsrs.lm.LM",
        'LM("openai/gpt-4o-mini")("hi")': "dsrs.types.Completion",
        'LM("openai/gpt-4o-mini")("hi").usage.cost_msats': "int | None",
        'Predict("question -> answer")(question="hi")': "dsrs.predict.prediction.Prediction",
        'LaneMux().add_lane("a", LM("openai/gpt-4o")).with_timeout(5)': "dsrs.lanes.mux.LaneMux",
        "CodexSdkLM().with_timeout(5).with_model('gpt-5-codex')": "dsrs.codex_sdk.CodexSdkLM",
        'PylonLM.new_swarm("wss://relay.example").with_timeout(5).with_budget_msats(10)': "dsrs.pylon.lm.PylonLM",
        "dsrs.Budget(1)": "dsrs.budget.Budget",
    }
    src = "import dsrs\nfrom dsrs import LM, LaneMux, Predict, CodexSdkLM, PylonLM\n"
    src += "".join(f"reveal_type({expr})\n" for expr in probes)
    (tmp_path / "probe.py").write_text(src)
    r = mypy(str(tmp_path / "probe.py"))
    revealed = [line.split('Revealed type is "', 1)[1].rstrip('"') for line in r.stdout.splitlines()
                if "Revealed type is" in line]  # fmt: skip
    assert revealed == list(probes.values()), r.stdout
