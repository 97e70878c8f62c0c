"""Signed model directories: a manifest of every file's sha256, signed with Ed25519.

A published model directory (a saved policy) carries two more files:

    manifest.json       {"files": {name: sha256, ...}, "round": ..., ...}: every other file, by hash
    manifest.sig        {"key-id": ..., "signature": base64}: Ed25519 over manifest.json's exact bytes

The coordinator signs every model it publishes with its key (coordinator/registry.py); an operator
can sign one for hand delivery (`fedbot-agent sign-model`). A robot pins the public keys it trusts
in its config and runs `verify_model_dir` before anything in the directory is parsed: the signature
over the manifest's bytes first, then the directory's file list against the manifest (nothing
missing, nothing extra), then each file's hash. Only then are JSON and weights read (by
fedbot/policy_io.py, which imports nothing named in them).

Keys are OpenSSH-format lines ("ssh-ed25519 AAAA... comment"), easy to paste into a TOML file; the
private key is a PKCS#8 PEM file readable by its owner only.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedbot.atomic_files import write_bytes_atomic

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
WEIGHTS = "model.safetensors"
MAX_MANIFEST_BYTES = 1 << 20  # a manifest lists a dozen files; anything bigger is not one
MAX_FILES = 64


class ModelNotTrusted(Exception):
    """A model directory that failed verification; the message says which check and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# -- keys ------------------------------------------------------------------------------------------
def generate_key(path: Path, comment: str) -> str:
    """Write a new Ed25519 private key to `path` (mode 0600) and its public line to `path`.pub;
    returns the public line. An existing key is kept."""
    path = Path(path)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        write_bytes_atomic(path, pem, private=True)
    public = public_line(load_private_key(path), comment)
    write_bytes_atomic(path.with_name(path.name + ".pub"), (public + "\n").encode())
    return public


def load_private_key(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def public_line(key: Ed25519PrivateKey, comment: str) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return f"{raw.decode()} {comment}".strip()


def parse_public_key(line: str) -> Ed25519PublicKey:
    """One trusted key as its OpenSSH line ("ssh-ed25519 AAAA... [comment]")."""
    parts = line.split()
    if len(parts) < 2 or parts[0] != "ssh-ed25519":
        raise ValueError(f"not an ssh-ed25519 public key line: {line[:60]!r}")
    key = serialization.load_ssh_public_key(f"{parts[0]} {parts[1]}".encode())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"not an Ed25519 key: {line[:60]!r}")
    return key


def key_id(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


# -- signing and verifying -------------------------------------------------------------------------
def model_version(manifest: dict) -> tuple[str, int] | None:
    """A published global model's version: (the run it comes from, its round), ordered by time since
    run names are their start times (coordinator/registry.py). None for a model without one (signed
    by hand, or malformed)."""
    run, server_round = manifest.get("run"), manifest.get("round")
    if isinstance(run, str) and isinstance(server_round, int) and not isinstance(server_round, bool):
        return run, server_round
    return None


def claimed_version(directory: Path) -> tuple[str, int] | None:
    """The version a model directory's manifest names, read without verifying it: only for telling
    the coordinator what a robot holds, never for a decision about the model itself."""
    try:
        manifest = json.loads(_read_small(Path(directory) / MANIFEST))
    except (ModelNotTrusted, OSError, ValueError):
        return None
    return model_version(manifest) if isinstance(manifest, dict) else None


def sign_model_dir(directory: Path, key: Ed25519PrivateKey, fields: dict) -> dict:
    """Write manifest.json (every file of `directory` by sha256, plus `fields`) and manifest.sig.
    Call it on a complete directory before it is published (renamed into place)."""
    directory = Path(directory)
    files = {
        path.name: sha256_file(path)
        for path in sorted(directory.iterdir())
        if path.is_file() and path.name not in (MANIFEST, SIGNATURE)
    }
    manifest = {**fields, "files": files, "sha256": files.get(WEIGHTS)}
    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
    signature = {"key-id": key_id(key.public_key()), "signature": base64.b64encode(key.sign(data)).decode()}
    write_bytes_atomic(directory / MANIFEST, data)
    write_bytes_atomic(directory / SIGNATURE, json.dumps(signature).encode())
    return manifest


def verify_model_dir(directory: Path, trusted: list[Ed25519PublicKey]) -> dict:
    """The manifest of `directory` if a trusted key signed it and every file matches it; raises
    ModelNotTrusted naming the failed check otherwise. Reads nothing but the manifest, its
    signature and the files' bytes (hashed, not parsed)."""
    directory = Path(directory)
    data = _read_small(directory / MANIFEST)
    try:
        signature = json.loads(_read_small(directory / SIGNATURE))
        signed_by = signature["key-id"]
        raw_signature = base64.b64decode(signature["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as error:
        raise ModelNotTrusted(f"{SIGNATURE} is malformed: {error}") from None
    keys = [key for key in trusted if key_id(key) == signed_by]
    if not keys:
        raise ModelNotTrusted(f"signed by key {signed_by!r}, which this robot does not trust")
    try:
        keys[0].verify(raw_signature, data)
    except InvalidSignature:
        raise ModelNotTrusted(
            f"the signature of {MANIFEST} does not verify (altered or not signed by the key)"
        ) from None
    manifest = json.loads(data)  # signed by a trusted key: now it may be parsed
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files or len(files) > MAX_FILES:
        raise ModelNotTrusted(f"{MANIFEST} lists no files")
    present = {path.name for path in directory.iterdir()} - {MANIFEST, SIGNATURE}
    if present != set(files):
        extra, missing = sorted(present - set(files)), sorted(set(files) - present)
        raise ModelNotTrusted(f"the directory does not hold the signed files (extra: {extra}, missing: {missing})")
    for name, digest in sorted(files.items()):
        path = directory / name
        if not path.is_file() or path.is_symlink():
            raise ModelNotTrusted(f"{name} is not a regular file")
        if sha256_file(path) != digest:
            raise ModelNotTrusted(f"{name} does not match its signed sha256 (altered after signing)")
    return manifest


def _read_small(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ModelNotTrusted(f"no {path.name}: the model is not signed") from None
    if len(data) > MAX_MANIFEST_BYTES:
        raise ModelNotTrusted(f"{path.name} is larger than {MAX_MANIFEST_BYTES} bytes")
    return data
