"""Files in and out: atomic writes and checked reads.

Writes: a file a user saved is never left half-written — each writer writes a temp file in the
same directory, fsyncs it and renames it over the target (a kill at any moment leaves the old
file or the new one). Reads: every loader of a user-given file goes through `read_bytes` /
`read_text` / `read_json` / `iter_lines` / `open_safetensors` / `read_image` / `parse`, so a bad
file ends in an `InputFileError` that names the file and the problem ("not UTF-8 text", "not a
safetensors file", "not a PNG/JPEG image", a line longer than the cap), never in a raw traceback.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from headlab.errors import HeadlabError, InputFileError

MAX_FILE_BYTES = int(os.environ.get("HEADLAB_MAX_FILE_BYTES", 1 << 30))
"""Largest whole file read into memory (1 GiB; HEADLAB_MAX_FILE_BYTES overrides)."""
MAX_LINE_BYTES = int(os.environ.get("HEADLAB_MAX_LINE_BYTES", 4 << 20))
"""Longest line of a line-based file (JSONL, CSV, text lists): 4 MiB (HEADLAB_MAX_LINE_BYTES overrides)."""


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()
"""The mode a plain `open(path, "w")` would give: mkstemp's temp files are 0600, and the rename keeps it."""


def _atomic(path: str | Path, write: Callable[[str], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)  # the data is on disk before the rename makes it the file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(text: str, path: str | Path) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic(path, write)


def atomic_write_json(obj: Any, path: str | Path) -> Path:
    return atomic_write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", path)


def atomic_save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return _atomic(path, lambda tmp: save_file(clean, tmp, metadata=dict(metadata) if metadata else None))


def atomic_write_parquet(frame: Any, path: str | Path) -> Path:
    return _atomic(path, lambda tmp: frame.to_parquet(tmp, index=False))


def atomic_save_png(array: Any, path: str | Path) -> Path:
    """An HxWx3 uint8 array as a PNG (needs pillow)."""
    from PIL import Image

    return _atomic(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG"))


# ---- checked reads --------------------------------------------------------------------------------
def _size_text(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n} bytes"


def checked_file(path: str | Path, what: str, max_bytes: int | None = None) -> Path:
    """`path` as a Path after checking it names a readable regular file of at most `max_bytes`."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{path}: no such file; give the path of {what}")
    if not path.is_file():
        raise InputFileError(f"{path}: not a file (a directory?); give the path of {what}")
    if not os.access(path, os.R_OK):
        raise InputFileError(f"{path}: not readable (permissions); give a readable {what}")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise InputFileError(f"{path}: {_size_text(path.stat().st_size)} is larger than the {_size_text(max_bytes)} headlab "
                             f"reads as {what} (HEADLAB_MAX_FILE_BYTES raises the cap)")
    return path


def read_bytes(path: str | Path, what: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    path = checked_file(path, what, max_bytes)
    try:
        return path.read_bytes()
    except OSError as e:
        raise InputFileError(f"{path}: cannot be read ({e.strerror or e}); give {what}") from None


def _decode(raw: bytes, path: Path, what: str, line: int | None = None) -> str:
    where = f"{path}, line {line}" if line is not None else str(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputFileError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                             f"give {what}, saved as UTF-8") from None
    if "\x00" in text:
        raise InputFileError(f"{where}: not UTF-8 text (a NUL byte at offset {text.index(chr(0))}: a binary file); "
                             f"give {what}")
    return text


def read_text(path: str | Path, what: str = "a UTF-8 text file", max_bytes: int = MAX_FILE_BYTES) -> str:
    """The whole file as text; InputFileError when it is missing, too large, binary or not UTF-8."""
    raw = read_bytes(path, what, max_bytes)
    return _decode(raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw, Path(path), what)


def iter_lines(path: str | Path, what: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) of a UTF-8 text file, one line in memory at a time;
    a line longer than `max_line_bytes` is an error naming it (a runaway line never fills memory)."""
    path = checked_file(path, what)
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            n += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise InputFileError(f"{path}, line {n}: longer than {_size_text(max_line_bytes)}; {what} must hold "
                                     f"shorter lines (HEADLAB_MAX_LINE_BYTES raises the cap)")
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            yield n, _decode(raw, path, what, n).rstrip("\r\n")


def read_json(path: str | Path, what: str = "a JSON file", max_bytes: int = MAX_FILE_BYTES) -> Any:
    """The parsed JSON value of a file; InputFileError (naming line and column) when it is not JSON."""
    text = read_text(path, what, max_bytes)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputFileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); give {what}") from None
    except RecursionError:
        raise InputFileError(f"{path}: JSON nested too deeply to read; give {what}") from None


@contextmanager
def parse(path: str | Path, what: str) -> Iterator[None]:
    """Turns the errors of interpreting a file's content (a missing field, a wrong type, a bad value)
    into an InputFileError that names the file and what it should have been."""
    try:
        yield
    except InputFileError:
        raise
    except HeadlabError as e:  # the content's own error (a PlanError, ...), kept as its kind, with the file named
        try:
            named = type(e)(f"{path}: {e}")
        except TypeError:
            named = InputFileError(f"{path}: {e}")
        raise named from None
    except (KeyError, IndexError) as e:
        raise InputFileError(f"{path}: not {what}: missing {e}") from None
    except (TypeError, ValueError, AttributeError, OverflowError, RecursionError) as e:
        raise InputFileError(f"{path}: not {what}: {e}") from None


@contextmanager
def open_safetensors(path: str | Path, what: str = "a safetensors file") -> Iterator[Any]:
    """`safe_open(path)` (torch tensors) with a clear error when the file is not a safetensors file
    (truncated, another format, a corrupt header)."""
    from safetensors import SafetensorError, safe_open

    path = checked_file(path, what)
    try:
        handle = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InputFileError(f"{path}: not a safetensors file ({str(e).splitlines()[0][:160]}); give {what}") from None
    with handle as f:
        try:
            yield f
        except (SafetensorError, RuntimeError) as e:
            raise InputFileError(f"{path}: damaged safetensors file ({str(e).splitlines()[0][:160]}); give {what}") from None


def safetensors_header(f: Any, path: str | Path, what: str) -> dict[str, Any]:
    """The JSON object under the `headlab` key of an open safetensors file's metadata ({} if absent)."""
    raw = (f.metadata() or {}).get("headlab")
    if raw is None:
        return {}
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise InputFileError(f"{path}: its 'headlab' header is not valid JSON; give {what}") from None
    if not isinstance(header, dict):
        raise InputFileError(f"{path}: its 'headlab' header is not a JSON object; give {what}")
    return header


def read_image(path: str | Path, what: str = "an image (PNG or JPEG)") -> Any:
    """An RGB PIL image; InputFileError when the file is not an image PIL can read."""
    from PIL import Image, UnidentifiedImageError

    path = checked_file(path, what, MAX_FILE_BYTES)
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError:
        raise InputFileError(f"{path}: not a PNG/JPEG image (PIL does not recognize it); give {what}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputFileError(f"{path}: damaged or unreadable image ({e}); give {what}") from None
