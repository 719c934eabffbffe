"""The compiler, kept apart from the kernels: CUDA source + options + arch -> cubin, cached.

Cubins are cached in memory and on disk (``$QCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/qconv``,
else ``~/.cache/qconv``), keyed by a hash of the sources (the module and every header it may
include), the options, the target arch and the NVRTC version, so a second process start compiles
nothing. A compile failure raises BackendError carrying the NVRTC log.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from pathlib import Path

from ..errors import BackendError

KERNEL_DIR = Path(__file__).resolve().parent / "cuda_kernels"
DEFAULT_OPTIONS = ("--std=c++17", "-default-device", "--extra-device-vectorization")
# Modules built on one architecture's own instructions (wgmma: sm_90a) compile for it alone.
ARCH_SPECIFIC = {"conv_s8_wgmma.cu": "sm_90"}

_lock = threading.Lock()
_memory: dict[str, bytes] = {}


def modules() -> list[str]:
    """Every kernel module (a .cu file; the .cuh files are headers that modules include), by file name."""
    return sorted(p.name for p in KERNEL_DIR.glob("*.cu"))


def headers() -> list[str]:
    return sorted(p.name for p in KERNEL_DIR.glob("*.cuh"))


def _nvrtc():
    try:
        from cuda.bindings import nvrtc
    except ImportError as e:
        raise BackendError(f"NVRTC is not importable ({e}): pip install qconv[cuda]") from None
    return nvrtc


def _check(nvrtc, result, call: str, log: str = "") -> None:
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, msg = nvrtc.nvrtcGetErrorString(result)
        text = msg.decode(errors="replace") if isinstance(msg, bytes) else str(msg)
        raise BackendError(f"{call} failed: {text}" + (f"\nNVRTC log:\n{log}" if log else ""))


def version() -> tuple[int, int]:
    nvrtc = _nvrtc()
    err, major, minor = nvrtc.nvrtcVersion()
    _check(nvrtc, err, "nvrtcVersion")
    return int(major), int(minor)


def cache_dir() -> Path:
    if os.environ.get("QCONV_CACHE_DIR"):
        return Path(os.environ["QCONV_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qconv"


def _sources(module: str) -> tuple[str, dict[str, str]]:
    main = (KERNEL_DIR / module).read_text()
    return main, {h: (KERNEL_DIR / h).read_text() for h in headers()}


def target_arch(module: str, arch: str) -> str:
    """The arch a module compiles for on a GPU of `arch`: itself, or "sm_90a" for the sm_90-only
    modules (BackendError elsewhere)."""
    need = ARCH_SPECIFIC.get(module)
    if need is None:
        return arch
    if arch != need:
        raise BackendError(f"{module} uses {need}a's instructions (wgmma) and runs on {need} GPUs only, not {arch}")
    return need + "a"


def cache_key(module: str, arch: str, options: tuple[str, ...] = DEFAULT_OPTIONS) -> str:
    main, hdrs = _sources(module)
    h = hashlib.sha256()
    for part in (module, main, *[k + "\0" + v for k, v in sorted(hdrs.items())], arch,
                 "\0".join(options), "nvrtc-%d.%d" % version()):
        h.update(part.encode())
        h.update(b"\1")
    return h.hexdigest()[:32]


def compile_module(module: str, arch: str, options: tuple[str, ...] = DEFAULT_OPTIONS,
                   use_disk: bool = True) -> bytes:
    """Cubin for `module` (a file name in cuda_kernels/) on `arch` (e.g. "sm_90")."""
    arch = target_arch(module, arch)
    key = cache_key(module, arch, options)
    with _lock:
        if key in _memory:
            return _memory[key]
    path = cache_dir() / f"{Path(module).stem}-{arch}-{key}.cubin"
    if use_disk:
        try:
            data = path.read_bytes()
            if data:
                with _lock:
                    _memory[key] = data
                return data
        except OSError:
            pass
    data = compile_source(*_sources(module), name=module, arch=arch, options=options)
    with _lock:
        _memory[key] = data
    if use_disk:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only home is no reason to fail; the memory cache still holds it
    return data


def compile_source(source: str, headers: dict[str, str], name: str, arch: str,
                   options: tuple[str, ...] = DEFAULT_OPTIONS) -> bytes:
    """Compile CUDA C++ to a cubin for `arch` with NVRTC; raises BackendError with the log."""
    nvrtc = _nvrtc()
    hnames = list(headers)
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), len(hnames),
                                         [headers[h].encode() for h in hnames],
                                         [h.encode() for h in hnames])
    _check(nvrtc, err, f"nvrtcCreateProgram({name})")
    try:
        opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in options]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _check(nvrtc, err, f"nvrtcCompileProgram({name}, {arch})", _log(nvrtc, prog))
        err, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(nvrtc, err, "nvrtcGetCUBINSize")
        buf = b" " * size
        (err,) = nvrtc.nvrtcGetCUBIN(prog, buf)
        _check(nvrtc, err, "nvrtcGetCUBIN")
        return bytes(buf)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _log(nvrtc, prog) -> str:
    err, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    return buf.rstrip(b"\0 ").decode(errors="replace")
