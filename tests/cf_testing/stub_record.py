"""Run cf_testing/stub_scenario.py on the ComfyUI stand-ins or on a real ComfyUI, and the record it is held to.

tests/pack/test_comfy_stubs.py runs it on the stand-ins, tests/integration/test_real_comfyui_stubs.py on a live
ComfyUI; both compare the result with the record from ComfyUI 0.3.64 stored next to the scenario.
"""

import json
import os
import subprocess

from cf_testing.comfyui import STUBS_DIR

SCENARIO = STUBS_DIR.parent / "stub_scenario.py"
RECORDED = STUBS_DIR.parent / "stub_scenario.comfyui-0.3.64.json"


def run_scenario(python: str, module_root: str, workdir, cwd=None) -> dict:
    env = dict(os.environ, PYTHONPATH=module_root)
    result = subprocess.run(
        [python, str(SCENARIO), str(workdir)], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])
