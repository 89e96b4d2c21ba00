"""The one fresh-interpreter harness of the reload tests.

`run_python(script, *args, cwd=...)` runs `script` in a new Python where longctx_hf cannot be imported at all: site
is skipped (-S), so the editable install's .pth file is never read, and a preamble puts site-packages back on
sys.path; after the script, the child checks that nothing imported longctx_hf. That is what a user without the
package sees. With `with_longctx_hf=True` the child imports this repository's package instead.
`run_json` also asserts success and returns the JSON the script printed last.
"""
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREAMBLE = (f"import importlib.util, sys\nsys.path.append({sysconfig.get_paths()['purelib']!r})\n"
            "assert importlib.util.find_spec('longctx_hf') is None, 'longctx_hf is importable in the child'\n")
EPILOGUE = "\nassert not [n for n in sys.modules if n.startswith('longctx_hf')], 'longctx_hf was imported'\n"


def run_python(script, *args, cwd, with_longctx_hf=False, timeout=600):
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(Path(cwd) / "hf_modules"), HF_HUB_OFFLINE="1")
    if with_longctx_hf:
        env["PYTHONPATH"] = str(REPO)
        command = [sys.executable, "-c", script]
    else:
        command = [sys.executable, "-S", "-c", PREAMBLE + script + EPILOGUE]
    return subprocess.run([*command, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=cwd)


def run_json(script, *args, cwd, with_longctx_hf=False, timeout=600):
    out = run_python(script, *args, cwd=cwd, with_longctx_hf=with_longctx_hf, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])
