"""Every kernel config of the plan's tables compiles for sm_90 (H100) with no register spill, within the shared
memory of a block and holding at least the programs per SM that the plan's resource table says, on the CPU:
`python -m kernels.compile_check --quick`, which covers every config once where it is heaviest, plus a corner
(the whole matrix: `python -m kernels.compile_check`)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_config_compiles_without_spills():
    # A child process, without TRITON_INTERPRET: conftest.py sets the flag before the kernels are imported, and
    # under it @triton.jit returns interpreted functions (and so do the helpers the kernels call), which
    # Triton cannot compile. A fresh import is the only clean way to get the JIT functions back.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--quick", "--jobs", str(os.cpu_count())],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr[-3000:]}"
