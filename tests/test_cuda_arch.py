"""The CUDA architecture rule (fastnn/_cuda_arch.py) against fake device capabilities: no GPU needed.

Each list is written as the build records it: cuda/CMakeLists.txt resolves `native`, `all` and `all-major`
before compiling (the lists below for those are what CMake 4 with CUDA 13 resolves them to).
"""
import pytest

from fastnn import _cuda_arch, _gpu

pytestmark = pytest.mark.gpu  # part of the GPU suite (bench/gpu_check.sh), though it needs no GPU

RELEASE = "80-real,86-real,89-real,90-real,90-virtual"          # the default list
NATIVE_H200 = "90-real"                                          # `native` on an H100 / H200
ALL = "75-real,80-real,86-real,87-real,88-real,89-real,90-real,100-real,103-real,110-real,120-real,121"
ALL_MAJOR = "75-real,80-real,90-real,100-real,110-real,120"

CASES = [  # (recorded list, compute capability, runs?)
    (RELEASE, (8, 0), True), (RELEASE, (8, 7), True),           # sm_86 machine code runs on 8.7
    (RELEASE, (9, 0), True), (RELEASE, (10, 0), True),          # PTX 90 is compiled by the driver for 10.0
    (RELEASE, (7, 5), False), ("90-real", (10, 0), False),       # machine code never crosses a major version
    (NATIVE_H200, (9, 0), True), (NATIVE_H200, (8, 9), False), (NATIVE_H200, (12, 0), False),
    (ALL, (7, 5), True), (ALL, (9, 0), True), (ALL, (12, 1), True), (ALL, (13, 0), True), (ALL, (7, 0), False),
    (ALL_MAJOR, (8, 6), True), (ALL_MAJOR, (9, 0), True), (ALL_MAJOR, (12, 1), True), (ALL_MAJOR, (7, 0), False),
    ("90a-real", (9, 0), True), ("90a-real", (9, 1), False),     # arch-specific code: exactly 9.0
    ("90a", (9, 0), True), ("90a-virtual", (10, 0), False),
    ("100f-real", (10, 3), True), ("100f-real", (11, 0), False),  # family code: same major, minor >= 0
    ("103f-real", (10, 0), False), ("100f-virtual", (10, 3), True), ("100f-virtual", (12, 0), False),
    ("80", (8, 0), True), ("80", (9, 0), True),                  # plain NN: machine code and PTX
    ("80-virtual", (7, 5), False), ("80-virtual", (8, 6), True),
    ("80-real;90a-real", (9, 0), True),                          # CMake's own separator is accepted too
    ("", (9, 0), False),
    # unresolved special values (an old record): accepted, a launch would fail with CUDA's own error
    ("native", (9, 0), True), ("all", (7, 5), True), ("all-major", (12, 0), True),
]


@pytest.mark.parametrize("archs, cc, runs", CASES, ids=[f"{a or 'empty'}@{c[0]}.{c[1]}" for a, c, _ in CASES])
def test_arch_rule(archs, cc, runs):
    assert _cuda_arch.supports(archs, cc) is runs
    assert _gpu._arch_supports(archs, cc) is runs     # the rule the GPU front end applies to each device


def test_arch_rule_parses_every_form():
    assert _cuda_arch.parse("90a-real, 100f ,80-virtual,all") == [
        (9, 0, "a", True, False), (10, 0, "f", True, True), (8, 0, "", False, True), "all"]
    for bad in ("sm_90", "90-ptx", "9.0", "native-real"):
        with pytest.raises(ValueError, match="CUDA architecture"):
            _cuda_arch.parse(bad)


def test_device_check_uses_the_recorded_list(monkeypatch):
    """_gpu's per-device check with a fake fastnn._cuda: the build record says 90-real (what `native`
    resolves to on an H200); a 9.0 device passes, an 8.0 device gets an error naming both."""
    class FakeCuda:
        def __init__(self, cc):
            self.cc = cc

        def device_properties(self, dev):
            return {"name": "Fake GPU", "compute_capability": self.cc}

        def build_info(self):
            return {"cuda_architectures": NATIVE_H200}

    for cc, ok in (((9, 0), True), ((8, 0), False)):
        monkeypatch.setattr(_gpu, "_state", {"cuda": FakeCuda(cc), "devices": {}, "reason": None})
        if ok:
            _gpu._check_device(0)
        else:
            with pytest.raises(RuntimeError, match=r"compute capability 8\.0.*built for 90-real"):
                _gpu._check_device(0)
