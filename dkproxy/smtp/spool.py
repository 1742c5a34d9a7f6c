"""Where a message waits between DATA and the downstream: memory, or a file when it is large.

A proxy holds every message until the downstream has accepted it. A hundred clients sending
1 MB each would otherwise keep 100 MB in the worker's memory, and one 50 MB message 50 MB;
like Postfix's queue files, messages past SPOOL_THRESHOLD go to an unlinked temporary file,
so the kernel's page cache holds them and the process keeps only a small buffer. The signer
reads the file through a read-only mmap (which has the bytes API the message parser needs)
and the relay reads it back in chunks.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterator

#: Messages up to this size stay in memory (almost all mail); larger ones go to a file.
SPOOL_THRESHOLD = 256 * 1024
#: How much the relay reads from a spool file at a time.
READ_CHUNK = 256 * 1024


class Spool:
    """Append-only message storage: a bytearray, moved to a temporary file past a threshold."""

    __slots__ = ("_file", "_map", "_memory", "_size", "directory", "threshold")

    def __init__(self, threshold: int = SPOOL_THRESHOLD, directory: str | None = None) -> None:
        self.threshold = threshold
        self.directory = directory
        self._memory: bytearray | None = bytearray()
        self._file: int | None = None  # file descriptor of the unlinked file
        self._size = 0
        self._map: mmap.mmap | None = None

    def __len__(self) -> int:
        return self._size

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def write(self, data: bytes) -> None:
        if self._memory is not None:
            if len(self._memory) + len(data) <= self.threshold:
                self._memory += data
                self._size += len(data)
                return
            self._move_to_file()
        assert self._file is not None
        _write_all(self._file, data)
        self._size += len(data)

    def _move_to_file(self) -> None:
        fd, path = tempfile.mkstemp(prefix="dkproxy-", suffix=".msg", dir=self.directory)
        os.unlink(path)  # nobody else needs a name; the space is freed when we close it
        self._file = fd
        memory, self._memory = self._memory, None
        if memory:
            _write_all(fd, memory)

    def buffer(self) -> bytes | bytearray | mmap.mmap:
        """The whole message as a bytes-like object with find/rfind/slicing.

        For a spooled message this is a read-only mmap: release() it when done, so that the
        pages stop counting against the process.
        """
        if self._memory is not None:
            return self._memory
        if self._map is None:
            assert self._file is not None
            if self._size == 0:
                return b""
            self._map = mmap.mmap(self._file, self._size, access=mmap.ACCESS_READ)
        return self._map

    def release(self) -> None:
        """Unmap the file view (the data stays in the file for the relay)."""
        mapped, self._map = self._map, None
        if mapped is not None:
            # A memoryview still alive keeps the map open until it is collected.
            with contextlib.suppress(BufferError):
                mapped.close()

    def chunks(
        self, size: int = READ_CHUNK, start: int = 0, end: int | None = None
    ) -> Iterator[bytes | bytearray | memoryview]:
        """Bytes start..end of the message in pieces, from memory or read from the file."""
        stop = self._size if end is None else min(end, self._size)
        if self._memory is not None:
            if start < stop:
                yield (
                    self._memory
                    if (start, stop) == (0, self._size)
                    else memoryview(self._memory)[start:stop]
                )
            return
        assert self._file is not None
        position = start
        while position < stop:
            piece = os.pread(self._file, min(size, stop - position), position)
            if not piece:
                raise OSError(f"spool file ended at {position} of {self._size} bytes")
            position += len(piece)
            yield piece

    def segment(self, start: int, end: int | None = None) -> Segment:
        """A part of the message for the relay (e.g. around a header field being dropped)."""
        return Segment(self, start, end)

    def close(self) -> None:
        self.release()
        self._memory = None
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Segment:
    """Bytes start..end of a spool, readable in chunks like the spool itself."""

    __slots__ = ("end", "spool", "start")

    def __init__(self, spool: Spool, start: int, end: int | None) -> None:
        self.spool = spool
        self.start = start
        self.end = end

    def chunks(self, size: int = READ_CHUNK) -> Iterator[bytes | bytearray | memoryview]:
        return self.spool.chunks(size, self.start, self.end)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
