"""Reading and writing .safetensors files as numpy arrays.

Writes are atomic: a crash or error mid-save never leaves a half-written file at the
target path. Reads are lazy: tensors are read one at a time (positioned reads, no memory map),
so multi-gigabyte checkpoints never have to fit in memory at once.
bfloat16 tensors are `ml_dtypes.bfloat16` numpy arrays on both sides.
"""

import json
import os
import secrets
from typing import Callable, Iterable, Tuple

import ml_dtypes
import numpy as np
import safetensors.numpy

from library.errors import UserError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def save_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (and string `metadata`) to `path`, replacing any existing file atomically."""
    _write_atomically(path, lambda handle: handle.write(serialize_safetensors(tensors, metadata)))


# safetensors dtype tags and their numpy types (bfloat16 and fp8 from ml_dtypes, as MindSpore reads them).
_NUMPY_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DTYPE_TAGS = {np.dtype(numpy_type): tag for tag, numpy_type in _NUMPY_DTYPES.items()}

# (name, shape, dtype, read) where read() returns the array; called once, when its bytes are written.
StreamedTensor = Tuple[str, Tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


def save_safetensors_streaming(entries: Iterable[StreamedTensor], path, metadata: dict[str, str] | None = None) -> None:
    """Like `save_safetensors`, but each tensor is produced and written one at a time, so a checkpoint
    larger than free memory can be written. The header is built from the declared shapes and dtypes."""
    entries = sorted(entries, key=lambda entry: entry[0])
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name, shape, dtype, _ in entries:
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _DTYPE_TAGS[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)

    def write(handle):
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        for name, shape, dtype, read in entries:
            array = np.require(np.asarray(read(), dtype=dtype), requirements="C")
            if tuple(array.shape) != tuple(shape):
                raise ValueError(f"{name}: declared shape {list(shape)}, produced {list(array.shape)}")
            handle.write(array.tobytes())

    _write_atomically(path, write)


def _write_atomically(path, write: Callable) -> None:
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    # Every writer gets its output folder made, as sd-scripts makes --output_dir (demo/ on a fresh clone).
    os.makedirs(folder, exist_ok=True)
    # Not tempfile.mkstemp: its 0600 mode would stick to the saved model; "x" honours the umask.
    temp_path = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        with open(temp_path, "xb") as temp_file:
            write(temp_file)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    _fsync_directory(folder)


def serialize_safetensors(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """The exact bytes of the .safetensors file holding `tensors` and `metadata`."""
    # safetensors.numpy reads raw memory from the array pointer, so a strided view
    # (e.g. a transpose) would be written in the wrong element order. Not
    # np.ascontiguousarray: it turns the 0-d LoRA alpha into shape [1].
    contiguous = {name: np.require(array, requirements="C") for name, array in tensors.items()}
    return safetensors.numpy.save(contiguous, metadata)


def _fsync_directory(folder: str) -> None:
    """Make the rename itself durable; not every platform lets a directory be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_MAX_HEADER_BYTES = 100 * 2**20  # the format's own limit


class SafetensorsReader:
    """Lazy view of one .safetensors file; use as a context manager (see `open_safetensors`).

    Tensors are read with positioned reads, not through a memory map: a mapped checkpoint's pages count in
    the process's resident memory while it is open (up to the whole file, 6.9 GiB for SDXL in fp16), read
    pages only sit in the page cache. Each read materialises one tensor."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise UserError(f"{self.path}: file not found")
        if os.path.isdir(self.path):
            raise UserError(f"{self.path} is a directory, expected a .safetensors file")
        self._handle = open(self.path, "rb")
        try:
            self._metadata, self._entries, self._data_start = self._read_header()
        except ValueError as error:
            self._handle.close()
            raise UserError(f"{self.path} is not a valid safetensors file (truncated?): {error}") from None

    def _read_header(self):
        size = os.fstat(self._handle.fileno()).st_size
        prefix = self._handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than its 8-byte header length")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"header of {header_bytes} bytes in a file of {size}")
        try:
            header = json.loads(self._handle.read(header_bytes))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"unreadable header ({error})") from None
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        data_start, data_bytes = 8 + header_bytes, size - 8 - header_bytes
        entries = {}
        for name, entry in header.items():
            try:
                dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
                shape = tuple(int(n) for n in entry["shape"])
                begin, end = (int(n) for n in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"tensor '{name}' has a malformed entry {entry}") from None
            if not 0 <= begin <= end <= data_bytes or end - begin != dtype.itemsize * int(np.prod(shape)):
                raise ValueError(f"tensor '{name}' at bytes {begin}-{end} does not fit the file or its shape")
            entries[name] = (entry["dtype"], dtype, shape, begin)
        return metadata, entries, data_start

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def close(self) -> None:
        self._handle.close()

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def keys(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _entry(self, name: str):
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor '{name}'") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name)[2]

    def dtype(self, name: str) -> str:
        """The safetensors dtype tag as stored in the header: "F32", "F16", "BF16", ..."""
        return self._entry(name)[0]

    def read(self, name: str) -> np.ndarray:
        """One tensor in its stored dtype (BF16 comes back as `ml_dtypes.bfloat16`)."""
        _, dtype, shape, begin = self._entry(name)
        array = np.empty(shape, dtype)
        buffer = memoryview(array.reshape(-1).view(np.uint8))
        done = 0
        while done < len(buffer):
            count = os.preadv(self._handle.fileno(), [buffer[done:]], self._data_start + begin + done)
            if count == 0:
                raise UserError(f"{self.path}: ends inside tensor '{name}' (truncated file)")
            done += count
        return array

    def read_float32(self, name: str) -> np.ndarray:
        return to_float32(self.read(name))


def open_safetensors(path) -> SafetensorsReader:
    """Open a .safetensors file for lazy, tensor-by-tensor reading."""
    return SafetensorsReader(path)


def read_metadata(path) -> dict[str, str]:
    """The `__metadata__` string map of a .safetensors file ({} when it has none)."""
    with open_safetensors(path) as reader:
        return reader.metadata


def to_float32(array: np.ndarray) -> np.ndarray:
    """Upcast float16/bfloat16 (or any real array) to float32, leaving float32 untouched."""
    if array.dtype == np.float32:
        return array
    return array.astype(np.float32)


def to_bfloat16(array: np.ndarray) -> np.ndarray:
    """Round to bfloat16 as a numpy array that `save_safetensors` stores with dtype "BF16"."""
    return np.asarray(array).astype(ml_dtypes.bfloat16)


def is_pickle_checkpoint(path) -> bool:
    return os.fspath(path).lower().endswith(PICKLE_SUFFIXES)


def refuse_pickle(path) -> None:
    """Stop before a pickle checkpoint: unpickling can run arbitrary code, and reading one needs torch."""
    if is_pickle_checkpoint(path):
        raise UserError(
            f"{os.fspath(path)} is a pickle checkpoint, which this trainer does not load (unpickling can run "
            "arbitrary code); convert it to .safetensors"
        )
