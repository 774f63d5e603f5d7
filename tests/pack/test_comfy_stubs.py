"""The ComfyUI stand-ins behave like ComfyUI 0.3.64 where the pack relies on them.

tests/cf_testing/stub_scenario.py makes the same calls on either implementation. Its record from a real
ComfyUI 0.3.64 is stored next to it; the stand-ins must reproduce it exactly. The real-ComfyUI suite
(tests/integration/test_real_comfyui_stubs.py) re-runs the scenario on a live ComfyUI against the same file.
"""

import json
import os
import subprocess
import sys

from cf_testing.comfyui import STUBS_DIR

SCENARIO = STUBS_DIR.parent / "stub_scenario.py"
RECORDED = STUBS_DIR.parent / "stub_scenario.comfyui-0.3.64.json"


def run_scenario(python: str, module_root: str, workdir, cwd=None) -> dict:
    env = dict(os.environ, PYTHONPATH=module_root)
    result = subprocess.run([python, str(SCENARIO), str(workdir)], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_stand_ins_match_recorded_comfyui(tmp_path):
    expected = json.loads(RECORDED.read_text())
    actual = run_scenario(sys.executable, str(STUBS_DIR), tmp_path)
    differences = {k: (actual.get(k), expected.get(k)) for k in set(actual) | set(expected)
                   if actual.get(k) != expected.get(k)}
    assert not differences, f"stand-in vs ComfyUI 0.3.64: {differences}"
