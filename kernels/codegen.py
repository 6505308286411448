"""Compile the Triton kernels for a CUDA GPU on a machine without one: registers, spills, shared memory.

Whether a tile config spills registers to local memory or overflows shared memory is decided by the
compiler alone, so it can be checked, and fixed, where no GPU is lent. `compiled_launches` runs the
real launchers with each kernel launch replaced by an ahead-of-time compile for the target, so the
configs checked are exactly the ones the launchers pick; the compiled binary's resource usage is read
with the `cuobjdump` that ships with Triton. `python -m kernels.codegen` prints the table for the
benchmark sizes. Binding arguments reuses Triton's own (private) launch-time specialisation, so that
alignment and divisibility hints match a real launch; `tests/kernels/test_gpu_codegen.py` notices if
a Triton upgrade moves it.

Run with TRITON_INTERPRET unset: under the interpreter there is nothing to compile.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, create_function_from_signature

from kernels.contrastive import launch as contrastive_launch
from kernels.contrastive import triton_kernels as contrastive_kernels
from kernels.roi_pool import launch as roi_pool_launch
from kernels.roi_pool import triton_kernels as roi_pool_kernels

# Most shared memory one program may use (opt-in maximum per block), by compute capability.
SHARED_MEMORY_LIMIT = {80: 166_912, 86: 101_376, 89: 101_376, 90: 232_448, 100: 232_448}
KERNEL_MODULES = (contrastive_kernels, roi_pool_kernels)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclasses.dataclass(frozen=True)
class CompiledLaunch:
    """One launch as the GPU would run it: which kernel, with what config, at what resource cost."""

    kernel: str
    arch: int
    dtype: str  # element type of the first pointer argument, e.g. "bf16"
    out_dtype: str  # element type of `out_ptr` where the kernel has one (region pooling), else "-"
    constants: dict
    num_warps: int
    registers: int  # per thread
    stack_bytes: int  # per thread local memory: register spills (these kernels keep no local arrays)
    shared_bytes: int  # per program

    def problems(self) -> list[str]:
        """What would make this launch slow or fail on the GPU; empty when none."""
        found = []
        if self.stack_bytes:
            found.append(f"spills {self.stack_bytes} bytes per thread to local memory")
        limit = SHARED_MEMORY_LIMIT[self.arch]
        if self.shared_bytes > limit:
            found.append(f"needs {self.shared_bytes} bytes of shared memory, sm_{self.arch} allows {limit}")
        return found


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the one kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        report = subprocess.run([CUOBJDUMP, "--dump-resource-usage", file.name],
                                capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK):(\d+)", report))
    if set(usage) != {"REG", "STACK"}:
        raise RuntimeError(f"cuobjdump's resource report has no REG/STACK fields:\n{report}")
    return int(usage["REG"]), int(usage["STACK"])


def _compile(kernel: JITFunction, target: GPUTarget, args: tuple, kwargs: dict) -> CompiledLaunch:
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constants, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constants, attrs), target=target,
                              options=options.__dict__)
    registers, stack = _resource_usage(compiled.asm["cubin"])
    pointer_types = [kind for kind in signature.values() if isinstance(kind, str) and kind.startswith("*")]
    return CompiledLaunch(
        kernel=kernel.__name__, arch=target.arch, dtype=pointer_types[0][1:],
        out_dtype=signature.get("out_ptr", "*-")[1:],
        constants={name: value for name, value in kwargs.items() if name not in ("num_warps", "num_stages")},
        num_warps=compiled.metadata.num_warps, registers=registers, stack_bytes=stack,
        shared_bytes=compiled.metadata.shared,
    )


@contextlib.contextmanager
def compiled_launches(arch: int) -> Iterator[list[CompiledLaunch]]:
    """Within the block, kernel launches compile for sm_`arch` instead of running; yields their reports."""
    if isinstance(contrastive_kernels.stats_partials_kernel, InterpretedFunction):
        raise RuntimeError("kernels were imported under TRITON_INTERPRET=1; run with it unset")
    if arch not in SHARED_MEMORY_LIMIT:
        raise ValueError(f"arch: got {arch}, expected one of {sorted(SHARED_MEMORY_LIMIT)}")
    target = GPUTarget("cuda", arch, 32)
    kernels = [value for module in KERNEL_MODULES for value in vars(module).values()
               if isinstance(value, JITFunction) and value.__name__.endswith("_kernel")]
    reports: list[CompiledLaunch] = []

    def compile_instead(kernel: JITFunction):
        def run(*args, grid, warmup, **kwargs):
            reports.append(_compile(kernel, target, args, kwargs))
        return run

    for kernel in kernels:
        kernel.run = compile_instead(kernel)
    try:
        yield reports
    finally:
        for kernel in kernels:
            del kernel.run  # back to JITFunction.run


def launch_benchmark_shapes(dtype: torch.dtype) -> None:
    """Every kernel once at the largest tiles its launcher picks (the sizes of the benchmarks), on CPU tensors."""
    images, texts = torch.randn(512, 768, dtype=dtype), torch.randn(2048, 768, dtype=dtype)
    scale = torch.tensor(20.0)
    row_valid, col_valid = torch.ones(512, dtype=torch.bool), torch.ones(2048, dtype=torch.bool)
    row_zeros, col_zeros = torch.zeros(512), torch.zeros(2048)
    row_lse, col_lse = torch.zeros(2, 512), torch.zeros(2, 2048)  # (max, log sum)
    # The defaults (one group / split for all blocks), and one block per group / split (a size-1 argument that
    # Triton specialises into its own binary, as GPUs take at small N) with the fused backward (fp16's default)
    # for bf16 and fp32 too.
    settings = [{}, {"groups": (8, 16), "splits": 16, "fused_backward": True}]
    if dtype != torch.float32:  # the tiles the GPU session compares with the default
        settings += [dict(zip(("block_m", "block_n", "block_k"), shape))
                     for shape in contrastive_launch.CANDIDATE_HALF_TILES]
    for setting in settings:
        tiles = contrastive_launch.TritonTiles(**setting)
        tiles.loss_terms(images, texts, scale, row_valid, col_valid, 0, None)
        tiles.grads(images, texts, scale, row_valid, col_valid, row_lse, col_lse, row_zeros, col_zeros, 0)
    # a rank of several: its column groups merged before the ranks merge theirs (here, with no one)
    contrastive_launch.TritonTiles().loss_terms(images, texts, scale, row_valid, col_valid, 0, lambda stats: stats)

    batch, regions, grid_hw, channels = 4, 100, (40, 40), 1024
    tokens = torch.randn(batch, grid_hw[0] * grid_hw[1], channels, dtype=dtype)
    boxes = torch.rand(batch, regions, 4) * 640
    rows, cols = roi_pool_launch.region_factors(boxes, torch.ones(batch, regions, dtype=torch.bool), grid_hw,
                                                grid_hw[0] / 640, -1)
    # Unnormalised, fused normalisation, and the split one GPUs take at small batches (both normalised paths
    # write fp32 rows).
    for normalize, second_pass in ((False, None), (True, False), (True, True)):
        pooled, norms = roi_pool_launch.pool_forward(tokens, rows, cols, grid_hw, normalize, second_pass)
        roi_pool_launch.pool_backward(torch.randn_like(pooled), pooled, norms, rows, cols, grid_hw)


def report(archs: list[int], dtypes: list[torch.dtype]) -> list[CompiledLaunch]:
    """Compiled launches of every kernel at the benchmark sizes, per arch and dtype, each config once."""
    reports: list[CompiledLaunch] = []
    for arch in archs:
        for dtype in dtypes:
            with compiled_launches(arch) as launches:
                launch_benchmark_shapes(dtype)
            reports += [launch for index, launch in enumerate(launches)
                        if launch not in reports and launch not in launches[:index]]
    return reports


def _markdown(reports: list[CompiledLaunch]) -> str:
    lines = ["| kernel | sm | dtype | out dtype | constants | warps | registers | spill bytes | shared KiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for launch in reports:
        constants = " ".join(f"{name}={value}" for name, value in launch.constants.items())
        lines.append(f"| {launch.kernel} | {launch.arch} | {launch.dtype} | {launch.out_dtype} | {constants} | "
                     f"{launch.num_warps} | {launch.registers} | {launch.stack_bytes} | "
                     f"{launch.shared_bytes / 1024:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable; "
                        "default 80 and 90)")
    parser.add_argument("--dtype", action="append", choices=["float32", "bfloat16", "float16"],
                        help="feature dtype (repeatable; default all three)")
    parser.add_argument("--json", help="also write the reports here")
    args = parser.parse_args(argv)
    reports = report(args.arch or [80, 90], [getattr(torch, name) for name in args.dtype or
                                             ["float32", "bfloat16", "float16"]])
    print(_markdown(reports))
    if args.json:
        with open(args.json, "w") as file:
            json.dump([dataclasses.asdict(launch) for launch in reports], file, indent=1)
    problems = [f"{launch.kernel} sm_{launch.arch} {launch.dtype}: {problem}"
                for launch in reports for problem in launch.problems()]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
