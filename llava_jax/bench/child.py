"""Each side of the benchmark runs in a fresh interpreter, so that each peak RSS is that side's alone.

The parent (`run_child`) starts `python -P .../llava_jax/bench/child.py SIDE OPTIONS_JSON`; the child runs
`jax_side.run` or `torch_side.run` and prints one line, `RESULT_MARK` + the result as JSON, on stdout (its log
goes to stderr). This file is run by path, not with `-m`: `-m llava_jax.bench.child` would import
`llava_jax/__init__.py`, hence jax and the model code, into the PyTorch side. Instead, for that side, the child
registers `llava_jax` as a bare package (its folder, without running its `__init__`), so that only this
package's light modules load.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RESULT_MARK = "LLAVA_JAX_BENCH_RESULT "
# side name -> (module of llava_jax.bench, function): each takes the options dict and returns a JSON-able dict
SIDES = {"jax": ("jax_side", "run"), "torch": ("torch_side", "run"),
         "jax_load": ("jax_side", "load_only"), "torch_load": ("torch_side", "load_only"),
         "jax_logits": ("jax_side", "logits"), "torch_logits": ("torch_side", "logits"),
         "jax_train": ("train_step", "jax_run"), "torch_train": ("train_step", "torch_run")}


def run_child(side: str, opts: dict, env: dict | None = None) -> dict:
    """Run one side in a fresh interpreter and return its result."""
    # -P: the script's folder (llava_jax/bench/) must not shadow top-level modules
    cmd = [sys.executable, "-P", str(Path(__file__).resolve()), side, json.dumps(opts)]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the {side} benchmark process failed (exit code {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARK):])


def _import_path(side: str) -> None:
    """Make `llava_jax` importable from this file's checkout: for the PyTorch side as a bare package."""
    root = Path(__file__).resolve().parent.parent  # .../llava_jax
    if side.startswith("torch"):
        import types

        package = types.ModuleType("llava_jax")
        package.__path__ = [str(root)]
        package.__file__ = str(root / "__init__.py")
        sys.modules["llava_jax"] = package
    else:
        sys.path.insert(0, str(root.parent))


def main(argv: list[str]) -> int:
    side, opts = argv[0], json.loads(argv[1])
    if side not in SIDES:
        raise SystemExit(f"unknown side {side!r}")
    import importlib

    module_name, function = SIDES[side]
    result = getattr(importlib.import_module(f"llava_jax.bench.{module_name}"), function)(opts)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    _import_path(sys.argv[1])
    sys.exit(main(sys.argv[1:]))
