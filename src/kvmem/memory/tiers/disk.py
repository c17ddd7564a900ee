"""The disk tier: one file per block, crash-safe, least recently used first out by bytes.

Files live in `<dir>/<fingerprint hex[:32]>/<block hash hex>.kv`, so an engine indexes only what its
own model, dtype and layout wrote, and a restart with the same ones answers from them. A file is a
`HEADER` (magic, format version, payload length, fingerprint digest, block hash, crc32 of the
payload, crc32 of the header) padded to `HEADER_BYTES`, then the payload (`payload.BlockFormat`).

Crash safety: a block is written to a temporary file in the same directory, fsynced, then renamed
over its name; readers therefore see a whole file or none (a crash leaves at most a `*.tmp`, deleted
at the next start). Whatever else can go wrong (a torn or truncated file from a failing disk, bits
flipped, a file of another model copied in) fails one of the header checks or the payload's crc32 on
read: the file is deleted and the prefix is recomputed; its bytes are never used.

LRU order survives restarts through mtimes (a hit sets the file's mtime). Thread-safe: the writer
thread adds files, the loader thread reads and may drop corrupt ones, the engine thread looks up.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections import OrderedDict
from pathlib import Path

import torch

from kvmem.memory.block_pool import BlockHash
from kvmem.memory.tiers.fingerprint import FORMAT_VERSION, KVFingerprint

MAGIC = b"KVMEMKV\x00"
_HEADER = struct.Struct("<8sIQ32s32sI")  # magic, version, payload length, fingerprint, key, payload crc32
HEADER_BYTES = 128  # the header, its own crc32, zero padding: payloads start aligned
SUFFIX = ".kv"


class CorruptBlockFile(ValueError):
    """A block file failed a check (the message says which)."""


def encode_header(fingerprint: bytes, key: BlockHash, payload: memoryview | bytes) -> bytes:
    head = _HEADER.pack(MAGIC, FORMAT_VERSION, len(payload), fingerprint, key, zlib.crc32(payload))
    head += struct.pack("<I", zlib.crc32(head))
    return head.ljust(HEADER_BYTES, b"\x00")


def decode_file(data_header: bytes, payload: bytearray | None, fingerprint: bytes, key: BlockHash,
                expected_len: int) -> None:
    """Raise CorruptBlockFile unless the header and `payload` (None: header only) are this block's."""
    if len(data_header) < HEADER_BYTES:
        raise CorruptBlockFile("truncated header")
    magic, version, length, fp, file_key, crc = _HEADER.unpack_from(data_header)
    (head_crc,) = struct.unpack_from("<I", data_header, _HEADER.size)
    if magic != MAGIC:
        raise CorruptBlockFile("bad magic")
    if zlib.crc32(data_header[:_HEADER.size]) != head_crc:
        raise CorruptBlockFile("header checksum mismatch")
    if version != FORMAT_VERSION:
        raise CorruptBlockFile(f"format version {version}, expected {FORMAT_VERSION}")
    if fp != fingerprint:
        raise CorruptBlockFile("written for another model, dtype or layout (fingerprint differs)")
    if file_key != key:
        raise CorruptBlockFile("holds another block")
    if length != expected_len:
        raise CorruptBlockFile(f"payload of {length} bytes, expected {expected_len}")
    if payload is not None:
        if len(payload) != length:
            raise CorruptBlockFile(f"truncated payload ({len(payload)} of {length} bytes)")
        if zlib.crc32(payload) != crc:
            raise CorruptBlockFile("payload checksum mismatch")


class DiskTier:
    medium = "STORAGE"  # KV events' medium for this tier: vLLM's name (MEDIUM_STORAGE) for its file-system offloading tier

    def __init__(self, root: str | os.PathLike, capacity_bytes: int, fingerprint: KVFingerprint,
                 block_nbytes: int) -> None:
        if capacity_bytes < HEADER_BYTES + block_nbytes:
            raise ValueError(f"kv_offload_disk_bytes ({capacity_bytes}) holds no KV block file "
                             f"({HEADER_BYTES + block_nbytes} bytes)")
        self.fingerprint = fingerprint.digest
        self.block_nbytes = block_nbytes
        self.file_bytes = HEADER_BYTES + block_nbytes
        self.capacity_bytes = capacity_bytes
        self.directory = Path(root) / fingerprint.hex[:32]
        self.directory.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.files: OrderedDict[BlockHash, int] = OrderedDict()  # key -> file size, oldest first
        self.used_bytes = 0
        self.num_evicted = 0
        self.num_indexed = self._index()

    # --- start ------------------------------------------------------------------------
    def _index(self) -> int:
        """What the directory holds for this fingerprint, oldest first; stray temporaries deleted.
        Headers are read on use, not here, so a start costs one stat per file."""
        found: list[tuple[float, BlockHash, int]] = []
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".tmp"):
                _unlink(entry.path)  # a write a crash interrupted
                continue
            if not entry.name.endswith(SUFFIX):
                continue
            try:
                key = bytes.fromhex(entry.name[:-len(SUFFIX)])
                st = entry.stat()
            except (ValueError, OSError):
                continue
            found.append((st.st_mtime, key, st.st_size))
        for _, key, size in sorted(found, key=lambda f: f[0]):
            self.files[key] = size
            self.used_bytes += size
        self._evict_to(self.capacity_bytes)
        return len(self.files)

    def path(self, key: BlockHash) -> Path:
        return self.directory / (key.hex() + SUFFIX)

    # --- lookups (engine thread) ------------------------------------------------------
    def __contains__(self, key: BlockHash) -> bool:
        with self.lock:
            return key in self.files

    def touch(self, key: BlockHash) -> bool:
        with self.lock:
            if key not in self.files:
                return False
            self.files.move_to_end(key)
            return True

    # --- writes (writer thread) -------------------------------------------------------
    def write(self, key: BlockHash, payload: torch.Tensor) -> bool:
        """Store a block (uint8 payload); False when it was here already. Crash-safe (module doc)."""
        if self.touch(key):
            return False
        data = memoryview(payload.contiguous().numpy()).cast("B")
        assert len(data) == self.block_nbytes
        final = self.path(key)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(encode_header(self.fingerprint, key, data))
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            _unlink(tmp)
            raise
        with self.lock:
            if key not in self.files:
                self.files[key] = self.file_bytes
                self.used_bytes += self.file_bytes
            self._evict_to(self.capacity_bytes)
        return True

    def _evict_to(self, capacity: int) -> None:
        """Delete the oldest files until the tier holds at most `capacity` bytes (lock held)."""
        while self.used_bytes > capacity and self.files:
            key, size = self.files.popitem(last=False)
            self.used_bytes -= size
            self.num_evicted += 1
            _unlink(self.path(key))

    # --- reads (loader thread) --------------------------------------------------------
    def read(self, key: BlockHash) -> torch.Tensor:
        """The block's payload (uint8), checked; raises CorruptBlockFile (after deleting the file) or
        KeyError (no such file any more)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                header = f.read(HEADER_BYTES)
                decode_file(header, None, self.fingerprint, key, self.block_nbytes)
                payload = bytearray(self.block_nbytes)
                n = f.readinto(payload)
                if f.read(1):
                    raise CorruptBlockFile("trailing bytes")
            del payload[n:]
            decode_file(header, payload, self.fingerprint, key, self.block_nbytes)
        except FileNotFoundError:
            self.drop(key)
            raise KeyError(key) from None
        except CorruptBlockFile:
            self.drop(key)
            _unlink(path)
            raise
        try:
            os.utime(path)  # most recently used, for the next start's order too
        except OSError:
            pass
        self.touch(key)
        return torch.frombuffer(payload, dtype=torch.uint8)

    def drop(self, key: BlockHash) -> None:
        with self.lock:
            size = self.files.pop(key, None)
            if size is not None:
                self.used_bytes -= size

    def clear(self) -> list[BlockHash]:
        with self.lock:
            keys = list(self.files)
            self._evict_to(0)
        return keys


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
