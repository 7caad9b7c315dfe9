#!/usr/bin/env python3
"""Compile every kernels/*.cu to PTX (kernels/ptx/<name>.ptx) with NVRTC 12.4.

Needs the pip wheels (in the Python that runs this script):
    nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-nvcc-cu12==12.4.131
NVRTC is called through ctypes, so no CUDA toolkit, GPU or driver is needed. The output is
deterministic: `.ci/kernels` regenerates into a temporary folder and diffs against the committed PTX.

Usage:
    python kernels/gen_ptx.py                 # (re)write kernels/ptx/
    python kernels/gen_ptx.py --out DIR       # write somewhere else (the CI freshness check)
"""

import argparse
import ctypes
import importlib.util
import sys
from pathlib import Path

# The one NVRTC release whose output is committed: PTX .version 8.4, loadable by R550+ drivers.
NVRTC_VERSION = (12, 4)
ARCH = "compute_80"
KERNELS_DIR = Path(__file__).resolve().parent


def wheel_dir(module):
    """Folder of an installed `nvidia.*` wheel package, e.g. nvidia.cuda_nvrtc."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            f"gen_ptx: Python package {module} not found in {sys.executable}; install "
            "nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cuda-runtime-cu12==12.4.127 "
            "nvidia-cuda-nvcc-cu12==12.4.131"
        )
    return Path(list(spec.submodule_search_locations)[0])


def load_nvrtc():
    lib_dir = wheel_dir("nvidia.cuda_nvrtc") / "lib"
    candidates = sorted(lib_dir.glob("libnvrtc.so*"))
    if not candidates:
        sys.exit(f"gen_ptx: no libnvrtc.so* in {lib_dir}")
    # libnvrtc dlopens libnvrtc-builtins by soname; loading it first from the wheel makes that
    # lookup succeed without LD_LIBRARY_PATH (which a running process cannot change for itself).
    for builtins in sorted(lib_dir.glob("libnvrtc-builtins.so*")):
        ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(str(candidates[0]))
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    major, minor = ctypes.c_int(), ctypes.c_int()
    check(nvrtc, nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    if (major.value, minor.value) != NVRTC_VERSION:
        sys.exit(
            f"gen_ptx: expected NVRTC {NVRTC_VERSION[0]}.{NVRTC_VERSION[1]}, found "
            f"{major.value}.{minor.value} ({candidates[0]})"
        )
    return nvrtc


def check(nvrtc, status, call, log=""):
    if status != 0:
        msg = nvrtc.nvrtcGetErrorString(status).decode()
        sys.exit(f"gen_ptx: {call} failed: {msg}\n{log}")


def compile_one(nvrtc, src_path, include_dirs):
    prog = ctypes.c_void_p()
    src = src_path.read_bytes()
    check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, src_path.name.encode(), 0,
                                          None, None), f"nvrtcCreateProgram({src_path.name})")
    opts = [f"--gpu-architecture={ARCH}", "-default-device"]
    opts += [f"-I{d}" for d in include_dirs]
    c_opts = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
    status = nvrtc.nvrtcCompileProgram(prog, len(opts), c_opts)
    log_size = ctypes.c_size_t()
    nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
    log = ctypes.create_string_buffer(log_size.value)
    nvrtc.nvrtcGetProgramLog(prog, log)
    log_text = log.value.decode(errors="replace").strip()
    check(nvrtc, status, f"nvrtcCompileProgram({src_path.name})", log_text)
    if log_text:
        # Warnings fail too: a kernel should compile cleanly.
        sys.exit(f"gen_ptx: {src_path.name} compiled with warnings:\n{log_text}")
    size = ctypes.c_size_t()
    check(nvrtc, nvrtc.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
    buf = ctypes.create_string_buffer(size.value)
    check(nvrtc, nvrtc.nvrtcGetPTX(prog, buf), "nvrtcGetPTX")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return buf.value.decode()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=KERNELS_DIR / "ptx",
                    help="output folder (default: kernels/ptx)")
    args = ap.parse_args()

    nvrtc = load_nvrtc()
    include_dirs = [
        KERNELS_DIR,
        wheel_dir("nvidia.cuda_runtime") / "include",
        wheel_dir("nvidia.cuda_nvcc") / "include",
    ]
    sources = sorted(KERNELS_DIR.glob("*.cu"))
    if not sources:
        sys.exit(f"gen_ptx: no .cu files in {KERNELS_DIR}")
    args.out.mkdir(parents=True, exist_ok=True)
    wanted = set()
    for src in sources:
        ptx = compile_one(nvrtc, src, include_dirs)
        out = args.out / f"{src.stem}.ptx"
        out.write_text(ptx if ptx.endswith("\n") else ptx + "\n")
        wanted.add(out.name)
        print(f"gen_ptx: {src.name} -> {out}")
    # The PTX folder is fully generated: drop files whose source is gone.
    for stale in sorted(args.out.glob("*.ptx")):
        if stale.name not in wanted:
            stale.unlink()
            print(f"gen_ptx: removed stale {stale}")


if __name__ == "__main__":
    main()
