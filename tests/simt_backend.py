"""The SIMT backend, test side: builds fastbn's CUDA sources as ordinary C++
that runs on the CPU (csrc/simt), and routes fastbn's operators to it.

Build: every file of csrc/cuda (and the test-only kernels of
tests/simt_kernels) is rewritten mechanically into build/simt/gen, keeping
every line where it was (`#line` names the real file, so compiler errors and
reports point at it):
  - `k<<<grid, block, smem, stream>>>(args)` becomes
    `k ->* ::simt::launch_config("k", SIMT_SITE, grid, block, smem, stream)(args)`;
  - `__shared__ T name[dims];` becomes a reference into the block's shared
    memory, `extern __shared__ T name[];` a pointer to its dynamic part;
  - `cudaLaunchCooperativeKernel(k, ...)` gets the kernel's name for the record;
  - `TORCH_LIBRARY_IMPL(lib, CUDA, m)` becomes `TORCH_LIBRARY_IMPL(lib_simt, CPU, m)`
    (and `TORCH_LIBRARY(lib, m)` `TORCH_LIBRARY(lib_simt, m)`), so the
    emulated kernels live in their own op library on CPU tensors.
The result is JIT-compiled with torch.utils.cpp_extension into build/simt
(ninja rebuilds only what changed), with csrc/simt/include ahead of torch's
headers: its cuda_runtime.h and c10/cuda/*.h supply the CUDA built-ins.

Use: `with simt_backend.active():` routes every fastbn::* operator call on
CPU tensors to fastbn_simt::* (below autograd, so fastbn's own autograd,
fake kernels and Python layers are what is tested). Each call runs twice, under two thread schedules, on
copies of its tensor arguments in guarded memory; the two results must be
bitwise equal, no guard byte may change, and the kernels' launches are
recorded per call.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fastbn"))
import _build  # noqa: E402  (fastbn/_build.py: the one source list)

sys.path.pop(0)

BUILD_DIR = Path(os.environ.get("FASTBN_SIMT_BUILD_DIR", ROOT / "build" / "simt"))
TEST_KERNELS = ["tests/simt_kernels/planted_bugs.cu", "tests/simt_kernels/features.cu"]


class SimtError(RuntimeError):
    """The emulator found a defect the kernels' outputs alone might hide."""


# ---------------------------------------------------------------------------
# Source rewriting
# ---------------------------------------------------------------------------

def _code_mask(text: str) -> list[bool]:
    """True for characters outside comments and string/char literals."""
    mask = [True] * len(text)
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            mask[k] = False
        i = j
    return mask


def _kernel_expression_start(text: str, end: int) -> int:
    """Start of the kernel expression that ends just before `end` (a
    `<<<`): an identifier path, possibly with template arguments."""
    i = end
    while i > 0 and text[i - 1].isspace():
        i -= 1
    if i > 0 and text[i - 1] == ">":
        depth = 0
        while i > 0:
            i -= 1
            if text[i] == ">":
                depth += 1
            elif text[i] == "<":
                depth -= 1
                if depth == 0:
                    break
    while i > 0 and (text[i - 1].isalnum() or text[i - 1] in "_:"):
        i -= 1
    return i


def _matching_close(text: str, start: int, mask: list[bool]) -> int:
    """Index of the `>>>` closing a launch configuration that starts at `start`."""
    depth = 0
    i = start
    while i < len(text):
        if mask[i]:
            c = text[i]
            if c in "([{":
                depth += 1
            elif c in ")]}":
                depth -= 1
            elif depth == 0 and text.startswith(">>>", i):
                return i
        i += 1
    raise ValueError(f"unterminated launch configuration at offset {start}")


_SHARED = re.compile(
    r"(?P<extern>extern\s+)?__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s+)?"
    r"(?P<decl>[^;{}()]*?)\s*;"
)
_DECLARATOR = re.compile(r"^(?P<type>.*?)\s*\b(?P<name>[A-Za-z_]\w*)\s*(?P<dims>(?:\[[^\]]*\]\s*)*)$", re.S)


def _rewrite_shared(match: re.Match) -> str:
    decl = _DECLARATOR.match(match.group("decl").strip())
    if decl is None:
        raise ValueError(f"cannot parse shared declaration {match.group(0)!r}")
    ctype, name, dims = decl.group("type"), decl.group("name"), re.sub(r"\s+", "", decl.group("dims"))
    if match.group("extern"):
        if dims != "[]":
            raise ValueError(f"extern __shared__ must be an array of unknown bound: {match.group(0)!r}")
        return f"{ctype}* {name} = ::simt::dynamic_shared<{ctype}>();"
    if dims:
        return f"{ctype} (&{name}){dims} = ::simt::shared_var<{ctype}{dims}>([] {{}}, SIMT_SITE);"
    return f"{ctype}& {name} = ::simt::shared_var<{ctype}>([] {{}}, SIMT_SITE);"


def rewrite_cuda_source(text: str) -> str:
    """The emulator's form of a CUDA source: same lines, launches and shared
    memory rewritten (see the module docstring)."""
    mask = _code_mask(text)
    edits: list[tuple[int, int, str]] = []  # (start, end, replacement)
    i = 0
    while True:
        i = text.find("<<<", i)
        if i < 0:
            break
        if not mask[i]:
            i += 3
            continue
        close = _matching_close(text, i + 3, mask)
        start = _kernel_expression_start(text, i)
        expression = " ".join(text[start:i].split())
        name = expression.split("<", 1)[0].split("::")[-1]
        edits.append((i, i + 3, f' ->* ::simt::launch_config("{name}", SIMT_SITE, '))
        edits.append((close, close + 3, ")"))
        i = close + 3
    for m in re.finditer(r"\bcudaLaunchCooperativeKernel\s*\(", text):
        if not mask[m.start()]:
            continue
        args_start = m.end()
        depth, j = 0, args_start
        while j < len(text) and not (depth == 0 and text[j] == ","):
            depth += text[j] in "(<[" and 1 or 0
            depth -= text[j] in ")>]" and 1 or 0
            j += 1
        name = " ".join(text[args_start:j].split()).split("<", 1)[0].split("::")[-1].strip("&* ")
        edits.append((m.start(), m.end(), f'::simt::cooperative_launch("{name}", SIMT_SITE, '))
    for m in _SHARED.finditer(text):
        if mask[m.start()]:
            edits.append((m.start(), m.end(), _rewrite_shared(m)))
    for m in re.finditer(r"\bTORCH_LIBRARY_IMPL\s*\(\s*(\w+)\s*,\s*CUDA\s*,", text):
        if mask[m.start()]:
            edits.append((m.start(), m.end(), f"TORCH_LIBRARY_IMPL({m.group(1)}_simt, CPU,"))
    for m in re.finditer(r"\bTORCH_LIBRARY\s*\(\s*(\w+)\s*,", text):
        if mask[m.start()]:
            edits.append((m.start(), m.end(), f"TORCH_LIBRARY({m.group(1)}_simt,"))
    out = []
    pos = 0
    for start, end, replacement in sorted(edits):
        if start < pos:
            raise ValueError(f"overlapping rewrites at offset {start}")
        assert "\n" not in replacement
        out.append(text[pos:start])
        # Keep the line count: a rewritten span that crossed lines keeps its newlines.
        out.append(replacement + "\n" * text.count("\n", start, end))
        pos = end
    out.append(text[pos:])
    return "".join(out)


def _write_if_changed(path: Path, content: str) -> None:
    if path.exists() and path.read_text() == content:
        return  # unchanged: ninja keeps the object file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


def generate_sources() -> list[str]:
    """Rewrites the CUDA sources (and their .cuh headers) into BUILD_DIR/gen;
    returns the translation units to compile."""
    cuda_dirs = sorted({(ROOT / s).parent for s in _build.CUDA_SOURCES + TEST_KERNELS})
    units = []
    for directory in cuda_dirs:
        for src in sorted(directory.iterdir()):
            if src.suffix not in {".cu", ".cuh"}:
                continue
            rel = src.relative_to(ROOT)
            out = BUILD_DIR / "gen" / rel.with_suffix(".cpp" if src.suffix == ".cu" else ".cuh")
            header = "#include <cuda_runtime.h>  // as nvcc includes it implicitly\n" if src.suffix == ".cu" else ""
            body = f'{header}#line 1 "{src}"\n{rewrite_cuda_source(src.read_text())}'
            _write_if_changed(out, body)
            if src.suffix == ".cu" and str(rel) in _build.CUDA_SOURCES + TEST_KERNELS:
                units.append(str(out))
    return units


# ---------------------------------------------------------------------------
# Build and load
# ---------------------------------------------------------------------------
_module = None


def load():
    """Builds (if stale) and loads the SIMT backend; returns its module."""
    global _module
    if _module is not None:
        return _module
    from torch.utils import cpp_extension

    units = generate_sources()
    include_dirs = [str(ROOT / "csrc" / "simt" / "include")]
    # "../batch_norm.h" from a generated csrc/cuda file resolves through the
    # real csrc/cuda (its own folder has no such file).
    include_dirs += sorted({str((ROOT / s).parent) for s in _build.CUDA_SOURCES + TEST_KERNELS})
    build_dir = BUILD_DIR / "ninja"
    build_dir.mkdir(parents=True, exist_ok=True)
    _module = cpp_extension.load(
        name="fastbn_simt",
        sources=units + [str(ROOT / s) for s in _build.SIMT_RUNTIME_SOURCES],
        extra_include_paths=include_dirs,
        extra_cflags=["-O2", "-fno-strict-aliasing"],
        build_directory=str(build_dir),
        with_cuda=False,
        is_python_module=True,
        verbose=os.environ.get("FASTBN_VERBOSE_BUILD") == "1",
    )
    return _module


# ---------------------------------------------------------------------------
# Routing fastbn's operators to the emulated kernels
# ---------------------------------------------------------------------------

@dataclass
class OpCall:
    op: str
    launches: list = field(default_factory=list)


def _storage_region(t: torch.Tensor) -> torch.Tensor:
    """The span of t's storage that t's elements lie in, as a 1-d view (so a
    copy of it is valid whatever t's strides, overlapping ones included)."""
    extent = 1 + sum((s - 1) * st for s, st in zip(t.size(), t.stride()))
    return t.as_strided((extent,), (1,), t.storage_offset())


def _guarded_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t in (guarded) freshly allocated memory, same sizes, strides
    and storage offset."""
    if t.numel() == 0:
        return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype)
    region = _storage_region(t)
    storage = torch.empty(t.storage_offset() + region.numel(), dtype=t.dtype)
    storage[t.storage_offset():].copy_(region)
    return storage.as_strided(t.size(), t.stride(), t.storage_offset())


def _flat_tensors(value) -> list:
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat_tensors(v)]
    return [value]


def _bitwise_equal(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def simt_op_names() -> list[str]:
    """The operators of the fastbn_simt library (every fastbn schema)."""
    prefix = "fastbn_simt::"
    return sorted(n[len(prefix):] for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


class Backend:
    """Runs operator calls on the SIMT backend with its checks; see the module docstring."""

    # The second schedule alternates between these; the first is always forward.
    SECOND_SCHEDULES = ("reverse", "shuffle")

    def __init__(self, module, guard_mode: str = "canary"):
        self.lib = module
        self.guard_mode = guard_mode
        self.calls: list[OpCall] = []
        self._count = 0

    def call(self, target, *args, second_schedule: str | None = None):
        """Calls the operator overload `target` (any CPU operator whose kernels
        are emulated) twice, under the forward schedule and another one, on
        guarded copies of its tensor arguments; checks that both runs agree
        bitwise and that no guard byte changed; writes mutated arguments
        back; records the launches. Returns the first run's result."""
        schema = target._schema
        mutated = [
            i for i, a in enumerate(schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write and i < len(args)
        ]
        if second_schedule is None:
            second_schedule = self.SECOND_SCHEDULES[self._count % len(self.SECOND_SCHEDULES)]
        self._count += 1
        name = schema.name
        runs = []
        for schedule in ("forward", second_schedule):
            self.lib.configure(schedule=schedule, seed=self._count)
            self.lib.take_launches()
            self.lib.install_guarded_allocator(self.guard_mode)
            try:
                guarded_args = [_guarded_copy(a) if isinstance(a, torch.Tensor) else a for a in args]
                result = target(*guarded_args)
            finally:
                self.lib.uninstall_guarded_allocator()
            launches = self.lib.take_launches()
            unchecked = self.lib.take_unchecked_error()
            if unchecked:
                raise SimtError(f"{name}: a launch failed and no check read the error: {unchecked}")
            damage = self.lib.check_guards()
            if damage:
                raise SimtError(f"{name}: memory outside a buffer changed: {damage}")
            runs.append((result, [guarded_args[i] for i in mutated], launches))
        (result, written, launches), (result2, written2, _) = runs
        for a, b in zip(_flat_tensors(result) + written, _flat_tensors(result2) + written2):
            if not _bitwise_equal(a, b):
                raise SimtError(
                    f"{name}: results differ between the forward and {second_schedule} thread "
                    "schedules (a race: a missing __syncthreads or an unordered write)"
                )
        for i, value in zip(mutated, written):
            if args[i] is not None and args[i].numel():
                _storage_region(args[i]).copy_(_storage_region(value))
        self.calls.append(OpCall(name.split("::", 1)[1], launches))
        return result


_active: Backend | None = None


@contextlib.contextmanager
def active(guard_mode: str = "canary"):
    """Inside the block, fastbn's operators on CPU tensors run the emulated
    CUDA kernels: each fastbn::op gets a CPU kernel, for the block only,
    that calls fastbn_simt::op through Backend.call. This sits below
    fastbn's autograd, fake kernels and Python layers, so those are what is
    tested, torch.compile and opcheck included; leaving the block removes
    the override and the real CPU kernels are back."""
    global _active
    backend = Backend(load(), guard_mode)
    override = torch.library.Library("fastbn", "IMPL")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
        for name in simt_op_names():
            target = getattr(torch.ops.fastbn_simt, name).default
            override.impl(name, functools.partial(backend.call, target), "CPU")
    previous, _active = _active, backend
    try:
        yield backend
    finally:
        _active = previous
        override._destroy()


def is_active() -> bool:
    return _active is not None
