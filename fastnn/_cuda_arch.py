"""Which GPUs a build of fastnn._cuda runs on: the CUDA architecture rule.

The build records the architecture list it compiled for (cuda/CMakeLists.txt resolves CMake's special
values `native`, `all` and `all-major` to the list they stand for before compiling), comma-separated, each
entry in CMake's CUDA_ARCHITECTURES syntax: `NN` (machine code and PTX), `NN-real` (machine code only) or
`NN-virtual` (PTX only), where NN is the compute capability times ten (`90` = 9.0, `120` = 12.0), with an
optional suffix: `a` (architecture-specific, e.g. `90a`: runs on that exact capability only) or `f`
(family-specific, e.g. `100f`: runs on the same major version with an equal or higher minor).

- Machine code for X.y runs on X.z with z >= y (same major version), `a` code on X.y alone.
- PTX for X.y is compiled by the driver for any device of capability >= X.y (`a` PTX: X.y alone; `f` PTX:
  the same major version, minor >= y).
- The literal special values (a record from a build that did not resolve them) name every architecture
  the toolkit supports (`all`, `all-major`) or the build machine's GPUs (`native`): the rule cannot check
  them and accepts any device; a kernel the device cannot run then fails at launch with CUDA's
  "no kernel image is available" error, as a RuntimeError naming the op.
"""
from __future__ import annotations

import re
from typing import Iterable, Tuple, Union

SPECIAL = ("native", "all", "all-major")
_ENTRY = re.compile(r"^(\d+)([af]?)(?:-(real|virtual))?$")


def parse(archs: Union[str, Iterable[str]]):
    """[(major, minor, suffix, real, virtual)] for a recorded list ("80-real,90a-real,90-virtual" or a list of
    entries); ValueError naming an entry that is not in CMake's syntax. Special values are returned as is."""
    items = archs.replace(";", ",").split(",") if isinstance(archs, str) else list(archs)
    out = []
    for item in items:
        item = item.strip()
        if not item:
            continue
        if item in SPECIAL:
            out.append(item)
            continue
        m = _ENTRY.match(item)
        if m is None:
            raise ValueError(f"CUDA architecture {item!r}: expected NN, NNa or NNf, optionally with -real or "
                             f"-virtual (CMake's CUDA_ARCHITECTURES syntax), or one of {', '.join(SPECIAL)}")
        n, suffix, kind = int(m.group(1)), m.group(2), m.group(3)
        out.append((n // 10, n % 10, suffix, kind in (None, "real"), kind in (None, "virtual")))
    return out


def supports(archs: Union[str, Iterable[str]], cc: Tuple[int, int]) -> bool:
    """Whether code built for `archs` runs on a device of compute capability cc = (major, minor)."""
    major, minor = int(cc[0]), int(cc[1])
    for entry in parse(archs):
        if isinstance(entry, str):  # an unresolved special value: see the module docstring
            return True
        a_major, a_minor, suffix, real, virtual = entry
        if suffix == "a":
            if (a_major, a_minor) == (major, minor):
                return True
            continue
        if real and a_major == major and a_minor <= minor:
            return True
        if virtual and (a_major == major if suffix == "f" else True) and (a_major, a_minor) <= (major, minor):
            return True
    return False
