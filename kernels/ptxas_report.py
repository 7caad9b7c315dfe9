#!/usr/bin/env python3
"""Assemble every kernels/ptx/*.ptx with ptxas for sm_80 and sm_90 and print a resource table.

Fails on any ptxas error or warning, and on any register spill (non-zero "spill stores" or
"spill loads"). ptxas comes from the pip wheel nvidia-cuda-nvcc-cu12==12.4.131 (in the Python
that runs this script), or from --ptxas PATH.
"""

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ("sm_80", "sm_90")
KERNELS_DIR = Path(__file__).resolve().parent

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+)'")
FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
SMEM = re.compile(r"(\d+) bytes smem")


def find_ptxas():
    spec = importlib.util.find_spec("nvidia.cuda_nvcc")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("ptxas_report: nvidia-cuda-nvcc-cu12 is not installed; pass --ptxas PATH")
    return Path(list(spec.submodule_search_locations)[0]) / "bin" / "ptxas"


def parse(log):
    """Per kernel: registers, shared memory, stack frame, spill stores, spill loads."""
    rows, current = {}, None
    for line in log.splitlines():
        if m := ENTRY.search(line):
            current = m.group(1)
            rows[current] = {"regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
        elif current is None:
            continue
        elif m := FRAME.search(line):
            rows[current].update(stack=int(m.group(1)), spill_st=int(m.group(2)),
                                 spill_ld=int(m.group(3)))
        elif m := USED.search(line):
            rows[current]["regs"] = int(m.group(1))
            if s := SMEM.search(line):
                rows[current]["smem"] = int(s.group(1))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptxas", type=Path, default=None)
    ap.add_argument("--ptx-dir", type=Path, default=KERNELS_DIR / "ptx")
    args = ap.parse_args()
    ptxas = args.ptxas or find_ptxas()
    files = sorted(args.ptx_dir.glob("*.ptx"))
    if not files:
        sys.exit(f"ptxas_report: no .ptx files in {args.ptx_dir}")

    failures = []
    header = f"{'file':<20} {'kernel':<32} {'arch':<6} {'regs':>5} {'smem':>6} {'stack':>6} " \
             f"{'spill st':>9} {'spill ld':>9}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for ptx in files:
            for arch in ARCHS:
                cmd = [str(ptxas), f"-arch={arch}", "-v", "--warning-as-error",
                       "-o", str(Path(tmp) / f"{ptx.stem}.{arch}.cubin"), str(ptx)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                log = proc.stdout + proc.stderr
                if proc.returncode != 0:
                    failures.append(f"{ptx.name} ({arch}): ptxas failed:\n{log}")
                    continue
                rows = parse(log)
                if not rows:
                    failures.append(f"{ptx.name} ({arch}): no kernel found in ptxas output:\n{log}")
                for kernel, r in sorted(rows.items()):
                    print(f"{ptx.name:<20} {kernel:<32} {arch:<6} {r['regs']:>5} {r['smem']:>6} "
                          f"{r['stack']:>6} {r['spill_st']:>9} {r['spill_ld']:>9}")
                    if r["spill_st"] or r["spill_ld"]:
                        failures.append(f"{ptx.name}: {kernel} spills on {arch}: "
                                        f"{r['spill_st']} bytes stores, {r['spill_ld']} bytes loads")
    if failures:
        print("\nptxas_report: FAILED", file=sys.stderr)
        for f in failures:
            print(f"  {f}", file=sys.stderr)
        sys.exit(1)
    print(f"ptxas_report: {len(files)} file(s) assembled for {', '.join(ARCHS)}, no spills")


if __name__ == "__main__":
    main()
