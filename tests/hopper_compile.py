"""Compile the Triton kernels that a CPU test ran under the interpreter for a Hopper GPU (sm_90), without a GPU.

The interpreter runs kernel bodies as numpy code, so it misses what only the compiler checks (a loop-carried value
changing type, a global that is not constexpr, an op the backend cannot lower). `recorded_launches()` records each
interpreted launch (kernel, argument types, constexpr values, launch options); `assert_compile_for_hopper` compiles
every distinct one with Triton's own compiler and ptxas, in a subprocess where triton is imported without
TRITON_INTERPRET (so `@triton.jit` gives compilable functions), and fails with the compiler's message.

    python tests/hopper_compile.py SPECS.json     # the subprocess: compile the specs, print one line per failure
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile

_POINTER_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int64": "i64", "int32": "i32",
                  "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages")


def _describe(value):
    """(signature type, value kept for constexprs) of one launch argument."""
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _POINTER_TYPES[str(value.dtype).removeprefix("torch.")], None
    if isinstance(value, bool):
        return "i1", value
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value
    if isinstance(value, float):
        return "fp32", value
    if value is None or isinstance(value, str):
        return "constexpr", value
    raise TypeError(f"cannot describe a launch argument of type {type(value).__name__}")


@contextlib.contextmanager
def recorded_launches():
    """Yields a list that collects one spec per interpreted kernel launch inside the block."""
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = [], InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        launches.append({"module": self.fn.__module__, "name": self.fn.__name__,
                         "args": [_describe(a) for a in args],
                         "kwargs": {k: _describe(v)[1] if k not in _LAUNCH_OPTIONS else v for k, v in kwargs.items()}})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    try:
        yield launches
    finally:
        InterpretedFunction.run = run


def assert_compile_for_hopper(launches) -> None:
    """Compile each distinct recorded launch for sm_90; raise AssertionError naming the kernels that fail."""
    assert launches, "no Triton kernel ran under the interpreter"
    specs = list({json.dumps(s, sort_keys=True): s for s in launches}.values())
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(specs, f)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    try:
        done = subprocess.run([sys.executable, __file__, f.name], env=env, capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    assert done.returncode == 0, f"compiling {len(specs)} kernel launches for sm_90 failed:\n{done.stdout}{done.stderr}"


def assert_what_runs_compiles_for_hopper(*calls) -> None:
    """Run each call (a test body on a small case) under the interpreter, then compile every kernel launch it
    made for sm_90."""
    with recorded_launches() as launches:
        for call in calls:
            call()
    assert_compile_for_hopper(launches)


def _compile(spec) -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = getattr(importlib.import_module(spec["module"]), spec["name"])
    values = dict(zip(kernel.arg_names, spec["args"]))
    values.update({k: ("constexpr", v) for k, v in spec["kwargs"].items() if k not in _LAUNCH_OPTIONS})
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(kernel.arg_names, kernel.params)):
        kind, value = values.get(name, ("constexpr", param.default))
        if param.is_constexpr or kind == "constexpr":
            signature[name], constexprs[(i,)] = "constexpr", value
        else:
            signature[name] = kind
    options = {k: spec["kwargs"][k] for k in _LAUNCH_OPTIONS if k in spec["kwargs"]}
    triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options=options)


def main(path: str) -> int:
    failures = 0
    for spec in json.load(open(path)):
        try:
            _compile(spec)
        except Exception as error:  # noqa: BLE001 - every compiler error is reported, one line per kernel
            failures += 1
            print(f"{spec['module']}.{spec['name']} {spec['kwargs']}: {type(error).__name__}: {error}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
