"""`ursa download --shard i/N`: the shards partition any URL list, and each one resumes on its own."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ursa.collect.download import Job, parse_shard, select_shard, shard_of
from ursa.collect.manifest import Manifest
from ursa.errors import CollectError

if TYPE_CHECKING:
    from conftest import FaultServer


@settings(max_examples=60, deadline=None)
@given(urls=st.lists(st.text(min_size=1, max_size=40), max_size=60, unique=True), n=st.integers(1, 17))
def test_shards_partition_any_url_list(urls: list[str], n: int) -> None:
    jobs = [Job(u, "a") for u in urls]
    shards = [select_shard(jobs, i, n) for i in range(n)]
    taken = [j.url for s in shards for j in s]
    assert sorted(taken) == sorted(urls)  # every URL in exactly one shard
    assert all(shard_of(u, n) == shard_of(u, n) < n for u in urls)  # deterministic
    assert all([j.url for j in s] == [u for u in urls if shard_of(u, n) == i] for i, s in enumerate(shards))  # order kept


def test_shard_is_a_hash_of_the_url_alone() -> None:
    # fixed values: a shard must not move between machines, Python versions or runs
    assert [shard_of(f"https://example.com/{i}.jpg", 16) for i in range(6)] == [shard_of(f"https://example.com/{i}.jpg", 16) for i in range(6)]
    assert shard_of("https://example.com/a.jpg", 16) == int.from_bytes(__import__("hashlib").sha1(b"https://example.com/a.jpg").digest()[:8], "big") % 16
    sizes = [len(select_shard([Job(f"https://h/{i}", "a") for i in range(4000)], i, 4)) for i in range(4)]
    assert min(sizes) > 900  # spread evenly


@pytest.mark.parametrize("bad", ["3/3", "-1/4", "a/b", "1", "0/0", "2/1", "1/2/3", ""])
def test_parse_shard_refuses(bad: str) -> None:
    with pytest.raises(CollectError, match="use i/N"):
        parse_shard(bad)
    assert parse_shard("3/16") == (3, 16) and parse_shard("0/1") == (0, 1)


@pytest.fixture
def url_list(tmp_path: Path, server: FaultServer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.chdir(tmp_path)
    urls = [server.url(f"img/{i}.jpg") for i in range(12)]
    Path("urls_teddy.txt").write_text("\n".join(urls) + "\n")
    return urls


def test_each_shard_downloads_its_urls_and_resumes_on_its_own(url_list: list[str], server: FaultServer, console_script) -> None:  # noqa: ANN001
    n = 3
    expect = {i: {u for u in url_list if shard_of(u, n) == i} for i in range(n)}
    # shard 0 alone, into its own folder (as on its own machine)
    code, _, err = console_script("download", "--lists", "urls_teddy.txt", "--dest", "s0", "--shard", f"0/{n}")
    assert code == 0, err
    assert f"shard 0/{n}: {len(expect[0])} of 12 URLs" in err
    assert {url for (_, url) in Manifest.load("s0").rows} == expect[0]
    # run again: it resumes, nothing is fetched twice
    hits = dict(server.hits)
    code, out, err = console_script("download", "--lists", "urls_teddy.txt", "--dest", "s0", "--shard", f"0/{n}")
    assert code == 0 and dict(server.hits) == hits
    # every shard, one after another, into one folder: each URL fetched once, in exactly one shard
    for i in range(n):
        code, _, err = console_script("download", "--lists", "urls_teddy.txt", "--dest", "all", "--shard", f"{i}/{n}")
        assert code == 0, err
        assert {url for (_, url) in Manifest.load("all").rows} == set().union(*(expect[k] for k in range(i + 1)))
    rows = Manifest.load("all").rows
    assert len(rows) == 12 and all(r["status"] == "ok" for r in rows.values())
    assert len([p for p in Path("all/teddy").iterdir() if not p.name.startswith(".")]) == 12
    assert all(v == 2 if shard_of(server.url(p.lstrip("/")), n) == 0 else v == 1 for p, v in server.hits.items())


@pytest.mark.parametrize("bad", ["3/3", "x", "-1/2", "1/0"])
def test_bad_shard_exits_2_with_the_fix(url_list: list[str], bad: str, console_script) -> None:  # noqa: ANN001
    code, _, err = console_script("download", "--lists", "urls_teddy.txt", "--dest", "d", "--shard", bad)
    assert code == 2 and "use i/N with 0 <= i < N" in err
    assert not Path("d").exists()


def test_two_shards_at_once_in_one_folder_are_refused(url_list: list[str], console_script) -> None:  # noqa: ANN001
    import fcntl

    lock = Path("d/.ursa/dataset.lock")
    lock.parent.mkdir(parents=True)
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # as another shard running now
        code, _, err = console_script("download", "--lists", "urls_teddy.txt", "--dest", "d", "--shard", "1/2")
    assert code == 2 and "need their own --dest each" in err
    code, _, err = console_script("download", "--lists", "urls_teddy.txt", "--dest", "d", "--shard", "1/2")
    assert code == 0, err
