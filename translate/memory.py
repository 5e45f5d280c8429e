"""The process's memory as the system counts it: pages of memory-mapped files that reading has made
resident (``release_mapped_pages``), and heap that the process has freed but the C library keeps
(``return_freed_memory``). Both are asked of the C library and the kernel directly, and both do
nothing where the system lacks the call (no /proc, no glibc).
"""

from __future__ import annotations

import ctypes

MADV_DONTNEED = 4  # Linux


def _libc():
    """The C library this process runs on (its functions looked up by name), or None."""
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # no C library to open by that name (Windows)
        return None


def release_mapped_pages(suffix: str = ".arrow") -> int:
    """Unmaps the resident pages of this process's read-only memory maps of ``suffix`` files
    (madvise MADV_DONTNEED), so reading a corpus through ``datasets``' memory maps does not leave
    every page read counted in the process's memory. The data stays valid: a later read maps the
    page again from the page cache (or the file). Returns the bytes of the mappings released; 0
    where /proc or madvise is missing."""
    madvise = getattr(_libc(), "madvise", None)
    if madvise is None:
        return 0
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            regions = [line.split() for line in maps]
    except OSError:  # no /proc
        return 0
    released = 0
    for fields in regions:
        if len(fields) < 6 or not fields[5].endswith(suffix) or "w" in fields[1]:
            continue
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), MADV_DONTNEED) == 0:
            released += end - start
    return released


def return_freed_memory() -> None:
    """Hands the heap that the process has freed back to the system (glibc keeps it otherwise),
    so a long job after a large temporary one starts as small as it will stay."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:  # glibc only
        trim(0)
