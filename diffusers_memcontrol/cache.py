"""Content-addressed on-disk cache of what the frozen encoders compute: VAE latent distributions, text embeddings.

The VAE and the text encoder never train, so encoding a training set once and reusing the result across epochs, runs
and search trials is exact. Entries are addressed by content, never by position or file name:

* a *namespace* is the SHA-256 of everything that changes the encoder's output: the model identity (path, revision,
  the encoder's config and a digest of its weights, the tokenizer), the resolution and crop mode, the cache format;
* an *entry key* inside a namespace is the SHA-256 of the input: the raw bytes of an image file (plus the flip variant),
  or the UTF-8 bytes of a caption.

So a subset of a cached dataset (the HPO set = proxy subset + D_mem x repeats), a reshuffled copy, or another process
of the same search all hit the same entries, and a changed model or resolution never reads a stale one.

Layout: ``<root>/<kind>/<namespace>/<shard>.safetensors``. A shard holds ``keys`` (uint8 [N, 32]) and the cached
tensors (rows aligned with the keys). Shards are written to a temporary file and renamed into place, and named by
the digest of their keys, so concurrent writers and crashes never leave a half-written or conflicting shard.
Captions themselves are never written (only their digests and embeddings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from .files import atomic_path, file_digest, write_text_atomic

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the on-disk layout; part of every namespace, so a format change never reads old shards."""
SHARD_BYTES = 256 * 2**20
"""Rows are flushed to a new shard when the pending rows reach this size (progress survives a crash)."""


def default_cache_dir() -> str:
    """The cache root: `$MEMCONTROL_CACHE_DIR`, else `$XDG_CACHE_HOME/diffusers_memcontrol` (~/.cache/...)."""
    if os.environ.get("MEMCONTROL_CACHE_DIR"):
        return os.environ["MEMCONTROL_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "diffusers_memcontrol")


def sha256_json(value: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable value (keys sorted, so dict order never matters)."""
    text = json.dumps(value, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_bytes(data: bytes) -> str:
    """SHA-256 hex digest of raw bytes (the content key of an image file or a caption)."""
    return hashlib.sha256(data).hexdigest()


def caption_key(caption: str) -> str:
    """Content key of a caption: the digest of its UTF-8 bytes (the caption itself is never stored)."""
    return sha256_bytes(caption.encode("utf-8"))


def _plain_config(config: Any) -> Any:
    """A JSON-friendly copy of a diffusers/transformers config (dict-like, or an object with `to_dict`)."""
    if config is None:
        return None
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    out = {}
    for key, value in dict(config).items():
        if key.startswith("_") or key in ("transformers_version", "name_or_path"):
            continue  # bookkeeping that does not change the outputs
        out[key] = value
    return out


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a module's state dict (what the module computes with)."""
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def tokenizer_digest(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's ids: class, vocabulary, merges, max length, padding side."""
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    ranks = getattr(tokenizer, "bpe_ranks", None)
    merges = sorted((" ".join(k), v) for k, v in ranks.items()) if isinstance(ranks, dict) else None
    return sha256_json({
        "class": type(tokenizer).__name__,
        "vocab": sorted(vocab.items()),
        "merges": merges,
        "model_max_length": getattr(tokenizer, "model_max_length", None),
        "padding_side": getattr(tokenizer, "padding_side", None),
        "lower": getattr(tokenizer, "do_lower_case", None),
    })


def model_identity(
    module: torch.nn.Module,
    model_path: str | None = None,
    revision: str | None = None,
    tokenizer: Any = None,
) -> dict:
    """Identity of a frozen encoder for cache namespaces: path/revision, config and weights digest (+ tokenizer)."""
    if model_path is not None and os.path.exists(model_path):
        model_path = os.path.realpath(model_path)
    identity = {
        "path": model_path,
        "revision": revision,
        "class": type(module).__name__,
        "config": _plain_config(getattr(module, "config", None)),
        "weights": weights_digest(module),
    }
    if tokenizer is not None:
        identity["tokenizer"] = tokenizer_digest(tokenizer)
    return identity


class FileHashMemo:
    """Remembers the SHA-256 of files by (path, size, mtime), so a large image folder is hashed only once.

    Stored in a small SQLite database under the cache root (safe with several processes). A changed file (new size or
    modification time) is hashed again.
    """

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._db = sqlite3.connect(path, timeout=60)
        self._db.execute("CREATE TABLE IF NOT EXISTS hashes (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, "
                         "digest TEXT)")
        # content keys (the latent cache's entry keys) of images that decoded in full: the pre-flight check's memo
        self._db.execute("CREATE TABLE IF NOT EXISTS decoded (digest TEXT PRIMARY KEY)")
        self._pending: list[tuple] = []

    def digest(self, path: str) -> str:
        """The SHA-256 of the file at `path` (from the memo when size and mtime are unchanged)."""
        st = os.stat(path)
        real = os.path.realpath(path)
        row = self._db.execute("SELECT size, mtime, digest FROM hashes WHERE path = ?", (real,)).fetchone()
        if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns:
            return row[2]
        digest = file_digest(path)
        self._pending.append((real, st.st_size, st.st_mtime_ns, digest))
        if len(self._pending) >= 1000:
            self.flush()
        return digest

    def lookup(self, path: str) -> str | None:
        """The remembered SHA-256 of the file at `path` when its size and mtime are unchanged, else None (no read)."""
        st = os.stat(path)
        row = self._db.execute("SELECT size, mtime, digest FROM hashes WHERE path = ?",
                               (os.path.realpath(path),)).fetchone()
        return row[2] if row is not None and row[0] == st.st_size and row[1] == st.st_mtime_ns else None

    def record(self, path: str, digest: str, st: os.stat_result) -> None:
        """Remember `digest` for the file at `path` as it was when `st` was taken (written at the next flush)."""
        self._pending.append((os.path.realpath(path), st.st_size, st.st_mtime_ns, digest))
        if len(self._pending) >= 1000:
            self.flush()

    def decoded(self, digests: Sequence[str]) -> set[str]:
        """The content keys among `digests` whose image is known to decode in full."""
        found: set[str] = set()
        digests = list(digests)
        for i in range(0, len(digests), 500):
            chunk = digests[i:i + 500]
            found.update(row[0] for row in self._db.execute(
                f"SELECT digest FROM decoded WHERE digest IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def mark_decoded(self, digests: Sequence[str]) -> None:
        """Remember that the images with these content keys decode in full."""
        if digests:
            with self._db:
                self._db.executemany("INSERT OR IGNORE INTO decoded VALUES (?)", [(d,) for d in digests])

    def flush(self) -> None:
        """Write the digests computed since the last flush."""
        if self._pending:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?)", self._pending)
            self._pending = []

    def close(self) -> None:
        """Flush and close the database."""
        self.flush()
        self._db.close()


class TensorCache:
    """Rows of tensors addressed by content keys inside one namespace folder; see the module docstring."""

    def __init__(self, root: str, kind: str, namespace: dict):
        self.namespace = dict(namespace, format=CACHE_FORMAT, kind=kind)
        self.namespace_digest = sha256_json(self.namespace)
        self.folder = os.path.join(root, kind, self.namespace_digest[:32])
        self._index: dict[bytes, tuple[str, int]] | None = None
        self.hits = 0
        self.misses = 0

    # --- reading ----------------------------------------------------------------------------------------------
    def _shards(self) -> list[str]:
        if not os.path.isdir(self.folder):
            return []
        return sorted(os.path.join(self.folder, n) for n in os.listdir(self.folder)
                      if n.endswith(".safetensors") and not n.startswith("."))

    def index(self) -> dict[bytes, tuple[str, int]]:
        """key (32 bytes) -> (shard path, row) over every readable shard of the namespace."""
        if self._index is None:
            from safetensors import safe_open

            index: dict[bytes, tuple[str, int]] = {}
            for shard in self._shards():
                try:
                    with safe_open(shard, framework="pt") as f:
                        keys = f.get_tensor("keys").numpy()
                except Exception as err:  # noqa: BLE001 - an unreadable shard is skipped, never trusted
                    logger.warning("Ignoring unreadable cache shard %s: %s", shard, err)
                    continue
                for row, key in enumerate(keys):
                    index.setdefault(key.tobytes(), (shard, row))
            self._index = index
        return self._index

    def contains(self, keys: Sequence[str]) -> list[bool]:
        """Whether each hex key is cached."""
        index = self.index()
        return [bytes.fromhex(k) in index for k in keys]

    def load(self, keys: Sequence[str], names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors `names` for hex `keys`, rows in the order of `keys` (every key must be cached)."""
        from safetensors import safe_open

        index = self.index()
        by_shard: dict[str, list[tuple[int, int]]] = {}
        for pos, key in enumerate(keys):
            found = index.get(bytes.fromhex(key))
            if found is None:
                raise KeyError(f"cache entry {key[:12]}... is missing from {self.folder}")
            by_shard.setdefault(found[0], []).append((found[1], pos))
        out: dict[str, torch.Tensor] = {}
        for shard, rows in by_shard.items():
            rows.sort()
            with safe_open(shard, framework="pt") as f:
                for name in names:
                    sl = f.get_slice(name)
                    start = 0
                    while start < len(rows):  # read contiguous runs of rows
                        end = start
                        while end + 1 < len(rows) and rows[end + 1][0] == rows[end][0] + 1:
                            end += 1
                        block = sl[rows[start][0]:rows[end][0] + 1]
                        if name not in out:
                            out[name] = torch.empty((len(keys), *block.shape[1:]), dtype=block.dtype)
                        positions = torch.tensor([p for _, p in rows[start:end + 1]])
                        out[name][positions] = block
                        start = end + 1
        return out

    # --- writing ----------------------------------------------------------------------------------------------
    def write(self, keys: Sequence[str], tensors: dict[str, torch.Tensor]) -> str:
        """Write one shard atomically (temporary file + rename); returns its path."""
        from safetensors.torch import save_file

        if not keys:
            raise ValueError("write() needs at least one key")
        os.makedirs(self.folder, exist_ok=True)
        meta_path = os.path.join(self.folder, "namespace.json")
        if not os.path.exists(meta_path):
            write_text_atomic(meta_path, json.dumps(self.namespace, indent=2, sort_keys=True, default=str))
        key_bytes = torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8)
        name = hashlib.sha256(key_bytes.numpy().tobytes()).hexdigest()[:40] + ".safetensors"
        path = os.path.join(self.folder, name)
        data = {"keys": key_bytes, **{k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}}
        with atomic_path(path) as tmp:
            save_file(data, tmp, metadata={"format": str(CACHE_FORMAT), "namespace": self.namespace_digest})
        if self._index is not None:
            for row, key in enumerate(keys):
                self._index.setdefault(bytes.fromhex(key), (path, row))
        return path

    def get_or_compute(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], dict[str, torch.Tensor]],
        names: Sequence[str],
        batch_size: int = 64,
        desc: str = "caching",
        progress: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Rows for unique hex `keys` (in order): cached ones are read, the others computed in batches and written.

        `compute(positions)` returns the tensors `names` for `keys[p]`, p in positions (one row per position).
        """
        if len(set(keys)) != len(keys):
            raise ValueError("get_or_compute expects unique keys; deduplicate first")
        present = self.contains(keys)
        missing = [i for i, ok in enumerate(present) if not ok]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        pending_keys: list[str] = []
        pending: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        pending_bytes = 0
        bar = tqdm(total=len(missing), desc=desc, disable=not progress or not missing, unit="item")
        for start in range(0, len(missing), batch_size):
            positions = missing[start:start + batch_size]
            result = compute(positions)
            for n in names:
                pending[n].append(result[n].detach().to("cpu"))
                pending_bytes += result[n].numel() * result[n].element_size()
            pending_keys.extend(keys[p] for p in positions)
            bar.update(len(positions))
            if pending_bytes >= SHARD_BYTES:
                self.write(pending_keys, {n: torch.cat(v) for n, v in pending.items()})
                pending_keys, pending, pending_bytes = [], {n: [] for n in names}, 0
        bar.close()
        if pending_keys:
            self.write(pending_keys, {n: torch.cat(v) for n, v in pending.items()})
        return self.load(keys, names) if keys else {}


def latent_cache(root: str, vae_identity: dict, resolution: int, center_crop: bool, interpolation: str = "lanczos"
                 ) -> TensorCache:
    """The cache of VAE latent distributions (scaled `mean`, `std`) of one model, resolution, crop and resize mode."""
    return TensorCache(root, "latents", {"vae": vae_identity, "resolution": int(resolution),
                                         "center_crop": bool(center_crop), "resize": f"shorter-side-{interpolation}"})


def text_cache(root: str, text_encoder_identity: dict) -> TensorCache:
    """The cache of text embeddings (`embeds`, last hidden state) of one text encoder + tokenizer."""
    return TensorCache(root, "text", {"text_encoder": text_encoder_identity, "output": "last_hidden_state"})
