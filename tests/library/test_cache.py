import os

from lora_pipeline.core.cache import DiskCache, FileMemo
from lora_pipeline.core.files import sha256_file


def test_file_memo_recomputes_only_new_or_changed_files(tmp_path):
    files = [tmp_path / f"{i}.bin" for i in range(3)]
    for i, path in enumerate(files):
        path.write_bytes(bytes([i]) * 10)
    cache = DiskCache(tmp_path / "cache")
    calls = []

    def hashed(path):
        calls.append(path.name)
        return sha256_file(path)

    first = FileMemo(cache, "sha256").map(hashed, files, 2, "hashing")
    assert sorted(calls) == ["0.bin", "1.bin", "2.bin"]
    assert first == [sha256_file(p) for p in files]
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # one index, not one file per image

    calls.clear()
    files[1].write_bytes(b"changed")
    os.utime(files[1], ns=(1, 1))  # even an old mtime differs from the remembered one
    (tmp_path / "3.bin").write_bytes(b"new")
    again = FileMemo(cache, "sha256").map(hashed, files + [tmp_path / "3.bin"], 2, "hashing")
    assert sorted(calls) == ["1.bin", "3.bin"]
    assert again[1] == sha256_file(files[1]) != first[1]
    assert again[0] == first[0]

    calls.clear()
    FileMemo(cache, "other-settings").map(hashed, files, 2, "hashing")
    assert len(calls) == 3  # another namespace (other settings) never sees these values


def test_file_memo_without_cache_always_computes(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"a")
    memo = FileMemo(None, "sha256")
    assert memo.map(sha256_file, [path], 1, "x") == [sha256_file(path)]
    memo.save()  # a no-op without a cache
