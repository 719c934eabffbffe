"""Packaging: what the sdist holds, the metadata, the extension's build, and (with
QCONV_INSTALL_CHECK=1, as `make install-check` and `make test` run it) a real install of the sdist
and of the wheel into fresh virtual environments, used from outside the source tree."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import qconv

ROOT = Path(__file__).resolve().parent.parent
INSTALL_CHECK = os.environ.get("QCONV_INSTALL_CHECK") == "1"


def _sh(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _can_build_here() -> str | None:
    """Why the sdist cannot be built without isolation in this environment (None if it can)."""
    try:
        import build  # noqa: F401
        import setuptools
    except ImportError as e:
        return f"{e.name} is not installed (make test installs the test extra)"
    if int(setuptools.__version__.split(".")[0]) < 77:
        return f"setuptools {setuptools.__version__} < 77 (the SPDX license needs 77; make test upgrades it)"
    return None


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> tuple[Path, str]:
    """The sdist, built as `python -m build --sdist` does (no isolation: the venv has setuptools
    >= 77, and an sdist compiles nothing), and the build's output."""
    why = _can_build_here()
    if why:
        pytest.skip(why)
    out = tmp_path_factory.mktemp("dist")
    p = _sh([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out, ROOT], cwd=ROOT)
    (path,) = out.glob("qconv-*.tar.gz")
    return path, p.stdout + p.stderr


def _names(sdist_path: Path) -> set[str]:
    with tarfile.open(sdist_path) as t:
        return {n.split("/", 1)[1] for n in t.getnames() if "/" in n}


def test_sdist_holds_everything_a_build_needs(sdist):
    names = _names(sdist[0])
    for f in ("csrc/build_cffi.py", "setup.py", "pyproject.toml", "LICENSE", "README.md", "MANIFEST.in"):
        assert f in names, f
    for f in (ROOT / "csrc").iterdir():  # every C source and header, the sanitizer script: all but build leftovers
        if f.is_file() and f.suffix not in (".o", ".so", ".pyc"):
            assert f"csrc/{f.name}" in names, f"csrc/{f.name} is not in the sdist: add it to MANIFEST.in"
    for f in ("src/qconv/data/exam1/input_tensor.bin", "src/qconv/data/PROVENANCE.md", "src/qconv/py.typed"):
        assert f in names, f
    assert not [n for n in names if n.endswith((".so", ".o", ".pyc")) or n == "src/qconv/_qconv_c.c"]


def test_sdist_holds_every_package_and_data_file(sdist):
    """A new subpackage without __init__.py, or a data file no package-data pattern matches, would
    be left out of the wheel and the sdist without an error: every one of them is listed here."""
    names = _names(sdist[0])
    pkg = ROOT / "src" / "qconv"
    for f in pkg.rglob("*"):
        rel = f.relative_to(ROOT).as_posix()
        if "__pycache__" in rel or not f.is_file() or f.suffix in (".so", ".o", ".pyc") or f.name == "_qconv_c.c":
            continue
        assert rel in names, f"{rel} is not shipped: add its pattern to [tool.setuptools.package-data]"
        if f.suffix == ".py":
            assert (f.parent / "__init__.py").is_file(), f"{f.parent} has no __init__.py: not a package"


def test_sdist_holds_what_the_readme_links_to(sdist):
    names = _names(sdist[0])
    readme = (ROOT / "README.md").read_text()
    links = set(re.findall(r"\]\(([^)#:]+)\)", readme)) | set(re.findall(r"`((?:docs|benchmarks)/[^`]+)`", readme))
    assert links, "the README links to docs/ and benchmarks/"
    for link in links:
        assert link.rstrip("/") in names or any(n.startswith(link.rstrip("/") + "/") for n in names), link


def test_sdist_metadata(sdist):
    with tarfile.open(sdist[0]) as t:
        pkg_info = t.extractfile(f"qconv-{qconv.__version__}/PKG-INFO").read().decode()  # type: ignore[union-attr]
    head = pkg_info.split("\n\n", 1)[0]
    assert "License-Expression: MIT" in head and "License-File: LICENSE" in head
    assert "Author: qconv authors" in head
    assert "Classifier: Programming Language :: Python :: 3" in head
    assert "Classifier: License ::" not in head  # an SPDX license expression replaces them
    assert "Project-URL" not in head and "Home-page" not in head  # none rather than a made-up one
    assert "Requires-Python: >=3.10" in head
    assert re.search(r'Requires-Dist: nvidia-ml-py[^;]*; extra == "energy"', head)


def test_building_prints_no_deprecation_warning(sdist):
    out = sdist[1]
    assert not re.search(r"deprecat", out, re.I), out[-3000:]


def test_every_optional_import_is_declared():
    """pynvml (the study's energy meter) comes from the `energy` extra; pynvml's own package is a
    deprecated shim, nvidia-ml-py is NVIDIA's."""
    used = [p for p in (ROOT / "src").rglob("*.py") if re.search(r"^\s*import pynvml", p.read_text(), re.M)]
    assert used, "pynvml is imported somewhere (study/energy.py)"
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^energy = \["nvidia-ml-py', text, re.M)


def test_license_file():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "qconv authors" in text


def _elf_sections(data: bytes) -> set[str]:
    """Section names of a 64-bit little-endian ELF file."""
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        base = shoff + i * shentsize
        name, = struct.unpack_from("<I", data, base)
        offset, size = struct.unpack_from("<QQ", data, base + 0x18)
        return name, offset, size

    _, str_off, str_size = header(shstrndx)
    table = data[str_off:str_off + str_size]
    return {table[n:table.index(b"\0", n)].decode() for n, _, _ in (header(i) for i in range(shnum))}


def _extension() -> Path:
    try:
        from qconv import _qconv_c
    except ImportError:
        pytest.skip("the C extension is not built here")
    return Path(_qconv_c.__file__)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF")
def test_extension_is_stable_abi_and_has_no_debug_info():
    so = _extension()
    assert so.name == "_qconv_c.abi3.so", so.name
    sections = _elf_sections(so.read_bytes())
    assert ".text" in sections and not {s for s in sections if s.startswith(".debug")}, sorted(sections)


# ---------------------------------------------------------------------------------------------
# the install check: `make install-check` (part of `make test`)


def _clean_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


def _check_installed(venv: Path, cwd: Path) -> None:
    env = _clean_env(venv)
    bin_ = venv / "bin"
    where = "import qconv, os; print(os.path.dirname(qconv.__file__))"
    site = _sh([bin_ / "python", "-c", where], cwd, env).stdout.strip()
    assert Path(site).resolve().is_relative_to(venv.resolve()), f"qconv imported from {site}, not the venv"
    v = _sh([bin_ / "qconv", "--version"], cwd, env).stdout
    assert v.split()[:2] == ["qconv", qconv.__version__] and site in v, v
    assert _sh([bin_ / "python", "-m", "qconv"], cwd, env).stdout.startswith("usage: qconv")
    backends = _sh([bin_ / "qconv", "backends"], cwd, env).stdout
    assert re.search(r"^reference\s+yes", backends, re.M) and re.search(r"^c-scalar\s+yes", backends, re.M), backends
    samples = _sh([bin_ / "qconv", "samples"], cwd, env).stdout
    assert f"{site}/data/exam1/input_tensor.bin" in samples, samples
    conv = _sh([bin_ / "qconv", "conv", "exam1/input", "exam1/kernel", "-p", "int8", "-n", "1"], cwd, env).stdout
    assert re.search(r"^NRMSE\s+\S+e-0[23] against", conv, re.M), conv
    _sh([bin_ / "convolution", "exam2/input", "exam2/kernel", "16", "-n", "1"], cwd, env)
    assert qconv.load_tensor(cwd / "output_tensor.bin").shape == (1, 28, 28, 128)


def _start(cmd: list, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _finish(p: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{' '.join(p.args)} exited {p.returncode}\n{out[-4000:]}"
    return out


@pytest.mark.skipif(not INSTALL_CHECK, reason="builds and installs the package (a minute): make install-check")
def test_install_from_sdist_and_wheel(sdist, tmp_path):
    """The sdist and the wheel, each installed into a fresh venv; then the installed commands run
    from a folder outside the source tree. The two builds compile at once (one core each)."""
    sdist_path, dist = sdist[0], tmp_path / "dist"
    venvs = {kind: tmp_path / f"venv-{kind}" for kind in ("sdist", "wheel")}
    for venv in venvs.values():  # pip comes from this venv (pip --python): a bare venv is enough
        _sh([sys.executable, "-m", "venv", "--without-pip", venv])
    env = _clean_env(tmp_path)
    # The sdist as a user installs it: pip builds it with build isolation, so pyproject's build
    # requirements are what is tested. The wheel: built from the sdist as `python -m build` does,
    # without isolation (this venv has the build requirements), to install on its own.
    sdist_install = _start([sys.executable, "-m", "pip", "--python", venvs["sdist"] / "bin" / "python",
                            "install", "-q", sdist_path], env, tmp_path)
    wheel_build = _start([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                          "-w", dist, sdist_path], env, tmp_path)
    _finish(wheel_build)
    out = _finish(sdist_install)
    assert not re.search(r"deprecat", out, re.I), out[-4000:]  # as `make demo`'s install prints them
    (wheel,) = dist.glob("qconv-*.whl")
    assert re.fullmatch(rf"qconv-{re.escape(qconv.__version__)}-cp310-abi3-linux_\w+\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as z:
        (so,) = [n for n in z.namelist() if n.startswith("qconv/_qconv_c")]
        assert so == "qconv/_qconv_c.abi3.so"
        assert not {s for s in _elf_sections(z.read(so)) if s.startswith(".debug")}
        assert f"qconv-{qconv.__version__}.dist-info/licenses/LICENSE" in z.namelist()
    _sh([sys.executable, "-m", "pip", "--python", venvs["wheel"] / "bin" / "python", "install", "-q", wheel],
        cwd=tmp_path, env=env)
    for kind, venv in venvs.items():
        elsewhere = tmp_path / f"run-{kind}"
        elsewhere.mkdir()
        _check_installed(venv, elsewhere)
        shutil.rmtree(venv)
