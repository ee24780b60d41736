"""Creates the virtualenv that the interop tests run in: `setup_venv.py VENV_DIR REQUIREMENTS`.

Run by the system `python3`. A lock file beside the venv serializes test processes that start at the
same time, and a stamp inside it records the requirements it was built from, so later runs return at
once. Prints the venv's python on success; pip's own output goes to stderr.
"""

import fcntl
import os
import subprocess
import sys
import venv
from pathlib import Path


def main() -> int:
    venv_dir, requirements = Path(sys.argv[1]), Path(sys.argv[2])
    wanted = requirements.read_text()
    stamp = venv_dir / "qforge-requirements.txt"
    python = venv_dir / "bin" / "python"
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(venv_dir.with_name(venv_dir.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and stamp.is_file() and stamp.read_text() == wanted:
            print(python)
            return 0
        stamp.unlink(missing_ok=True)
        if not python.exists():
            venv.create(venv_dir, with_pip=True, clear=True)
        env = dict(os.environ)
        # llama-cpp-python compiles llama.cpp, and pip caches the wheel for every later venv on this
        # machine: build portable AVX2 code rather than -march=native, and skip the multimodal library.
        env.setdefault("CMAKE_ARGS", "-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF")
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-r", str(requirements)]
        if subprocess.run(pip, env=env, stdout=sys.stderr).returncode != 0:
            print(f"pip install -r {requirements} into {venv_dir} failed", file=sys.stderr)
            return 1
        stamp.write_text(wanted)
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
