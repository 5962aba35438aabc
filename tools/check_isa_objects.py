#!/usr/bin/env python3
"""Check that only the per-ISA kernel code uses AVX: the baseline code of fastnn._C (bindings, dispatcher,
thread control, the generic kernels, and any library code the linker kept) must run on any x86-64 CPU.

    python tools/check_isa_objects.py [BUILD_DIR]      (default build/wheel, left by tools/build_wheel.sh)

Disassembles (objdump -d) two things in a CMake build tree of fastnn:
  1. the generic kernel objects (CMakeFiles/fastnn_isa_generic.dir): no instruction past baseline x86-64;
  2. the linked, unstripped modules (_C*.so, and _cuda*.so's host code when built): every function whose name is not inside the avx2 / avx512 /
     avx512bf16 kernel namespaces (fastnn::cpu::avx2::, fastnn::cpu::avx512::, fastnn::cpu::avx512bf16::, their lambdas, the parallel pieces and
     template instantiations included) is baseline. This is the check that matters: module.cpp,
     dispatch.cpp and threads.cpp are compiled with -flto (pybind11's default), so their objects hold no
     machine code, and an inline function or template compiled in several ISA units is kept once by the
     linker — if it were an AVX copy, baseline code calling it would crash older CPUs with SIGILL.
As a self-test of the pattern, the avx2 objects must show ymm + FMA, the avx512 objects zmm + FMA and the
avx512bf16 object zmm + the bf16 dot product (vdpbf16ps).
And the FMA peak probe of every ISA unit (probe.cpp.o) keeps its chains in registers: no memory operand
in its arithmetic loops.
Exit status 0 when clean, 1 with the offending functions and instructions listed otherwise.
"""
from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

ISA_NAMESPACES = ("fastnn::cpu::avx2::", "fastnn::cpu::avx512::", "fastnn::cpu::avx512bf16::")
# Past baseline x86-64 (SSE2): AVX/AVX2/AVX-512/FMA/F16C are VEX/EVEX encoded (mnemonics v*, ymm/zmm and
# mask registers); BMI1/2, LZCNT/TZCNT, POPCNT and MOVBE are separate extensions a -m flag also enables.
_VEX_MNEMONIC = re.compile(r"^v(?!err|erw)[a-z0-9]+")
_EXT_MNEMONIC = re.compile(
    r"^(andn|bextr|blsi|blsmsk|blsr|bzhi|mulx|pdep|pext|rorx|sarx|shlx|shrx|lzcnt|tzcnt|popcnt|movbe)[lqw]?$")
_WIDE_REGISTER = re.compile(r"%(ymm|zmm)\d+|%k[0-7]\b")
_FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")


def disassemble(path):
    """(function, mnemonic, operands) for every instruction in path."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "-w", path],
                         check=True, capture_output=True, text=True).stdout
    function = "?"
    for line in out.splitlines():
        m = _FUNCTION.match(line)
        if m:
            function = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0].strip().endswith(":"):
            continue
        text = parts[1].strip().split("#")[0]
        if not text:
            continue
        fields = text.split(None, 1)
        mnemonic = fields[0]
        if mnemonic in ("rep", "repz", "repnz", "lock", "notrack", "bnd", "data16") and len(fields) > 1:
            fields = fields[1].split(None, 1)
            mnemonic = fields[0]
        yield function, mnemonic, fields[1] if len(fields) > 1 else ""


def beyond_baseline(mnemonic, operands):
    return bool(_VEX_MNEMONIC.match(mnemonic) or _EXT_MNEMONIC.match(mnemonic) or _WIDE_REGISTER.search(operands))


def in_isa_unit(function):
    return any(ns in function for ns in ISA_NAMESPACES)


def has_code(obj):
    return any(True for _ in disassemble(obj))


def report(label, bad):
    """bad: {function: [instructions]}; prints them, returns the count."""
    for function, instrs in sorted(bad.items()):
        shown = ", ".join(sorted(set(instrs))[:6])
        print(f"  {label}: {function}: {len(instrs)} instruction(s) beyond baseline x86-64, e.g. {shown}")
    return len(bad)


_ARITH = re.compile(r"^v?(fmadd|mulp|addp|dpbf16ps)")


def probe_loops(obj):
    """The loops (a backward jump's range) of the peak probes' functions in obj (fma_seconds, and the bf16
    dot product's dot_seconds) whose body does 8 or more vector multiply / add / FMA / dot-product
    instructions, as (function, instructions, instructions touching memory)."""
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "-w", obj],
                         check=True, capture_output=True, text=True).stdout
    function, body = "?", []
    loops = []
    for line in out.splitlines() + [""]:
        m = _FUNCTION.match(line)
        if m or not line.strip():
            for i, (addr, text) in enumerate(body):
                jump = re.match(r"j\w+\s+([0-9a-f]+)\b", text)
                if jump and int(jump.group(1), 16) < addr:
                    loop = [t for a, t in body[:i + 1] if a >= int(jump.group(1), 16)]
                    if ("fma_seconds" in function or "dot_seconds" in function) and sum(
                            bool(_ARITH.match(t)) for t in loop) >= 8:
                        loops.append((function, len(loop), [t for t in loop if "(%" in t and not t.startswith("nop")]))
            body = []
            if m:
                function = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) >= 2 and parts[0].strip().endswith(":"):
            body.append((int(parts[0].strip()[:-1], 16), parts[1].strip()))
    return loops


def check_probe_loops(objects):
    """The FMA peak probe (csrc/cpu/probe.cpp) of every ISA path, and the bf16 dot product's probe of the
    avx512bf16 path (csrc/cpu/gemm_bf16.cpp), keep their accumulator chains in registers: their arithmetic
    loops read and write no memory. Chains that spill measure store-to-load latency (they did on AVX2: 16
    chains in 16 YMM registers), and every "% of peak" of the bench is then wrong."""
    problems = 0
    objs = [o for name in ("probe.cpp.o", "gemm_bf16.cpp.o")
            for o in glob.glob(os.path.join(objects, "fastnn_isa_*.dir", "**", name), recursive=True)]
    for obj in sorted(objs):
        name = os.path.relpath(obj, objects)
        loops = probe_loops(obj)
        spilled = [(f, n, mem) for f, n, mem in loops if mem]
        if not loops:
            print(f"FAIL {name}: no FMA / dot-product loop found in the peak probe")
            problems += 1
        elif spilled:
            for function, n, mem in spilled:
                print(f"FAIL {name}: {function}: the probe's loop ({n} instructions) spills: {', '.join(mem[:4])}")
            problems += 1
        else:
            print(f"ok   {name}: {len(loops)} probe loop(s), all in registers")
    return problems


def main(argv):
    build = argv[1] if len(argv) > 1 else "build/wheel"
    objects = os.path.join(build, "CMakeFiles")
    if not os.path.isdir(objects):
        print(f"check_isa_objects: {build} is not a CMake build tree of fastnn (no CMakeFiles/)", file=sys.stderr)
        return 2
    problems = 0

    # 1. Generic kernel objects (compiled without ISA flags, no LTO): nothing past baseline at all.
    generic = sorted(glob.glob(os.path.join(objects, "fastnn_isa_generic.dir", "**", "*.o"), recursive=True))
    baseline = sorted(glob.glob(os.path.join(objects, "_C.dir", "**", "*.o"), recursive=True))
    if not generic or not baseline:
        print(f"check_isa_objects: no generic or _C objects under {objects}", file=sys.stderr)
        return 2
    for obj in generic + baseline:
        bad = {}
        n = 0
        for function, mnemonic, operands in disassemble(obj):
            n += 1
            if beyond_baseline(mnemonic, operands):
                bad.setdefault(function, []).append(mnemonic)
        name = os.path.relpath(obj, objects)
        if n == 0:
            print(f"ok   {name}: no machine code in the object (LTO bytecode): checked in the linked module")
            continue
        problems += report(name, bad)
        print(f"{'ok  ' if not bad else 'FAIL'} {name}: {n} instructions")

    # 2. The linked modules (fastnn._C, and the host code of fastnn._cuda when built): only functions of the
    # avx2 / avx512 kernel namespaces may use AVX.
    modules = sorted(glob.glob(os.path.join(build, "_C*.so")) + glob.glob(os.path.join(build, "**", "_cuda*.so"), recursive=True))
    if not modules:
        print(f"check_isa_objects: no linked _C*.so in {build}", file=sys.stderr)
        return 2
    for so in modules:
        bad, n, isa_functions = {}, 0, set()
        for function, mnemonic, operands in disassemble(so):
            n += 1
            if in_isa_unit(function):
                isa_functions.add(function)
            elif beyond_baseline(mnemonic, operands):
                bad.setdefault(function, []).append(mnemonic)
        problems += report(os.path.basename(so), bad)
        print(f"{'ok  ' if not bad else 'FAIL'} {os.path.basename(so)}: {n} instructions, "
              f"{len(isa_functions)} functions in the ISA namespaces may use AVX, all others baseline")
        if n == 0:
            print(f"FAIL {so} has no symbols to attribute code to (stripped?)")
            problems += 1

    # Self-test: the pattern must see the ISA units' instructions, else it proves nothing.
    for isa, needle, arith in (("avx2", re.compile(r"%ymm"), "vfmadd"), ("avx512", re.compile(r"%zmm"), "vfmadd"),
                               ("avx512bf16", re.compile(r"%zmm"), "vdpbf16ps")):
        objs = glob.glob(os.path.join(objects, f"fastnn_isa_{isa}.dir", "**", "*.o"), recursive=True)
        if not objs:
            continue  # not an x86-64 build
        seen_fma = False
        seen = False
        for obj in objs:
            for _, mnemonic, operands in disassemble(obj):
                seen = seen or bool(needle.search(operands))
                seen_fma = seen_fma or mnemonic.startswith(arith)
        if not (seen and seen_fma):
            print(f"FAIL self-test: the {isa} objects show no {needle.pattern} / {arith}: the check or the flags are broken")
            problems += 1
        else:
            print(f"ok   self-test: the {isa} objects use {needle.pattern[1:]} registers and {arith}")

    problems += check_probe_loops(objects)

    if problems:
        print(f"check_isa_objects: {problems} problem(s): baseline code must not use instructions past x86-64, "
              "and the FMA probe's chains must stay in registers")
        return 1
    print("check_isa_objects: baseline code is free of AVX/AVX2/AVX-512/FMA/BMI instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
