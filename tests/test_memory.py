"""The process's memory (memory.py): mapped pages released, freed heap handed back, and nothing
done where the system lacks the call."""

from __future__ import annotations

from pathlib import Path

import pytest

from translate import memory
from translate.memory import release_mapped_pages, return_freed_memory


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_released_arrow_pages_leave_the_process_and_the_data_stays(tmp_path):
    import pyarrow as pa

    def resident_file_kb() -> int:
        status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
        return int(status["RssFile"].split()[0])

    path = tmp_path / "data.arrow"
    table = pa.table({"s": [f"sentence number {i} " * 4 for i in range(200_000)]})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    mapped = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    text = mapped.column("s").to_pylist()  # every page of the file read through the map
    before = resident_file_kb()
    assert release_mapped_pages() >= path.stat().st_size
    assert resident_file_kb() < before - path.stat().st_size // 2048  # at least half the file gone
    assert mapped.column("s").to_pylist() == text  # and still readable


def test_without_the_c_library_calls_nothing_is_done(monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda: None)
    assert release_mapped_pages() == 0
    return_freed_memory()  # no glibc: nothing to trim, no error


def test_freed_heap_is_handed_back_through_malloc_trim(monkeypatch):
    calls = []

    class Libc:
        def malloc_trim(self, pad: int) -> int:
            calls.append(pad)
            return 1

    monkeypatch.setattr(memory, "_libc", Libc)
    return_freed_memory()
    assert calls == [0]
