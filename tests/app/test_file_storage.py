"""Files on disk under their server-made ids: uploads streamed in with a size limit, files that appear
whole or not at all, streamed downloads, and no way to name a path outside the storage folder."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from app.file_storage import FileStorage, FileTooLarge, is_file_id, new_file_id


async def _agen(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        await asyncio.sleep(0)
        yield chunk


def _entries(storage: FileStorage) -> list[str]:
    return sorted(os.listdir(storage.root))


@pytest.fixture
def storage(tmp_path) -> FileStorage:
    return FileStorage(tmp_path / "files")


def test_storage_creates_its_folder(tmp_path):
    root = tmp_path / "a" / "b"
    FileStorage(root)
    assert root.is_dir()


def test_new_file_ids_are_file_dash_24_lowercase_hex_and_unique():
    ids = {new_file_id() for _ in range(1000)}
    assert len(ids) == 1000
    for file_id in ids:
        assert is_file_id(file_id)
        assert file_id.startswith("file-") and len(file_id) == 29
        assert file_id[5:] == file_id[5:].lower()


@pytest.mark.parametrize("bad_id", [
    "../etc/passwd", "file-../../x", "/etc/passwd", "file-" + "a" * 23, "file-" + "a" * 25,
    "file-" + "A" * 24, "file-" + "g" * 24, "file-" + "a" * 23 + "/", "file-" + "a" * 24 + "\n",
    "file-" + "a" * 24 + "/..", "..", "", "file-abc", " file-" + "a" * 24, None, 123,
])
def test_ids_not_made_by_the_server_are_rejected_by_every_method(storage, bad_id):
    for call in (storage.path, storage.exists, storage.open, storage.delete, storage.iter_chunks):
        with pytest.raises(ValueError):
            call(bad_id)
    with pytest.raises(ValueError):
        with storage.writer(bad_id):
            pass
    with pytest.raises(ValueError):
        asyncio.run(storage.save_upload(bad_id, _agen(b"x"), 10))
    assert _entries(storage) == []
    assert not (storage.root.parent / "x").exists()


def test_save_upload_streams_chunks_to_the_file_and_returns_its_size(storage):
    file_id = new_file_id()
    size = asyncio.run(storage.save_upload(file_id, _agen(b"hello ", b"", b"world\n"), max_bytes=100))
    assert size == 12
    assert storage.exists(file_id)
    assert storage.path(file_id).read_bytes() == b"hello world\n"
    assert storage.size(file_id) == 12
    assert _entries(storage) == [file_id]   # no temporary file left


def test_upload_exactly_at_the_limit_is_kept(storage):
    file_id = new_file_id()
    assert asyncio.run(storage.save_upload(file_id, _agen(b"12345", b"67890"), max_bytes=10)) == 10
    assert storage.exists(file_id)


def test_upload_over_the_limit_raises_as_soon_as_it_passes_and_leaves_no_file(storage):
    file_id = new_file_id()
    consumed = []

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(100):
            consumed.append(i)
            yield b"x" * 10

    with pytest.raises(FileTooLarge) as info:
        asyncio.run(storage.save_upload(file_id, chunks(), max_bytes=25))
    assert info.value.max_bytes == 25
    assert "25 bytes" in str(info.value)
    assert len(consumed) == 3   # stopped at the chunk that passed the limit
    assert not storage.exists(file_id)
    assert _entries(storage) == []


def test_upload_that_fails_midway_leaves_no_file(storage):
    file_id = new_file_id()

    async def chunks() -> AsyncIterator[bytes]:
        yield b"part"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        asyncio.run(storage.save_upload(file_id, chunks(), max_bytes=100))
    assert _entries(storage) == []


def test_open_and_iter_chunks_read_the_file_back_in_pieces(storage):
    file_id = new_file_id()
    data = os.urandom(200_000)
    with storage.writer(file_id) as fp:
        fp.write(data)
    with storage.open(file_id) as fp:
        assert fp.read() == data
    chunks = list(storage.iter_chunks(file_id, size=65536))
    assert [len(c) for c in chunks] == [65536, 65536, 65536, 200_000 - 3 * 65536]
    assert b"".join(chunks) == data


def test_iter_chunks_of_a_missing_file_fails_at_once_not_mid_download(storage):
    with pytest.raises(FileNotFoundError):
        storage.iter_chunks(new_file_id())


def test_iter_chunks_of_an_empty_file_yields_nothing(storage):
    file_id = new_file_id()
    with storage.writer(file_id):
        pass
    assert list(storage.iter_chunks(file_id)) == []


def test_writer_file_appears_only_when_the_block_ends(storage):
    file_id = new_file_id()
    with storage.writer(file_id) as fp:
        fp.write(b"line 1\n")
        fp.flush()
        assert not storage.exists(file_id)   # not visible under its id while being written
        fp.write(b"line 2\n")
    assert storage.path(file_id).read_bytes() == b"line 1\nline 2\n"
    assert _entries(storage) == [file_id]


def test_writer_leaves_nothing_when_the_block_raises(storage):
    file_id = new_file_id()
    with pytest.raises(RuntimeError):
        with storage.writer(file_id) as fp:
            fp.write(b"half a file")
            raise RuntimeError("boom")
    assert not storage.exists(file_id)
    assert _entries(storage) == []


def test_writer_that_fails_keeps_the_earlier_file_of_that_id_intact(storage):
    file_id = new_file_id()
    with storage.writer(file_id) as fp:
        fp.write(b"old")
    with pytest.raises(RuntimeError):
        with storage.writer(file_id) as fp:
            fp.write(b"new")
            raise RuntimeError("boom")
    assert storage.path(file_id).read_bytes() == b"old"


def test_delete_removes_the_file_and_a_missing_file_is_fine(storage):
    file_id = new_file_id()
    with storage.writer(file_id) as fp:
        fp.write(b"x")
    storage.delete(file_id)
    assert not storage.exists(file_id)
    storage.delete(file_id)
    storage.delete(new_file_id())


def test_open_of_a_missing_file_raises_file_not_found(storage):
    with pytest.raises(FileNotFoundError):
        storage.open(new_file_id())


def test_stale_temporary_files_from_a_crash_are_removed_but_young_ones_kept(storage):
    stale = storage.root / ".tmp-stale"
    young = storage.root / ".tmp-young"
    stale.write_bytes(b"x")
    young.write_bytes(b"y")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    kept = new_file_id()
    with storage.writer(kept) as fp:
        fp.write(b"k")
    os.utime(storage.path(kept), (old, old))
    assert storage.remove_stale_temp_files(older_than_s=3600) == 1
    assert _entries(storage) == sorted([".tmp-young", kept])
