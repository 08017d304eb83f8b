"""Training data: the four formats, brace lists, shard splitting, unsafe tar paths, bad samples."""

import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.data import (
    Batch,
    DataError,
    EpochBatchSampler,
    PairDataset,
    Skip,
    WebDatasetShards,
    collate,
    count_tar_samples,
    detect_type,
    expand_braces,
    iter_tar_samples,
    make_loader,
    read_csv,
    read_folder,
    read_jsonl,
    safe_member_name,
    shuffled,
)


def transform(img):
    # A deterministic stand-in for the training crop that still draws from torch's RNG (as the
    # real random crop does), so the per-sample seeding is exercised.
    x = torch.from_numpy(np.asarray(img.resize((8, 8)), dtype="float32")).permute(2, 0, 1)
    return x / 255 + torch.rand(1) * 1e-3


def tokenizer(texts):
    # Characters as ids, padded to 12: enough to tell captions apart in the tests.
    out = torch.zeros(len(texts), 12, dtype=torch.long)
    for i, t in enumerate(texts):
        ids = [ord(c) % 500 for c in t[:12]]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def _png(colour=(200, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="PNG")
    return buf.getvalue()


def _images(tmp_path, n=6):
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(n):
        (d / f"{i}.png").write_bytes(_png((i * 40, 0, 0)))
    return d


def test_csv_paths_resolve_against_the_csv_folder(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "train.csv").write_text('filepath,title\nimgs/0.png,a red thing\nimgs/1.png,"a, comma"\n')
    pairs = read_csv(tmp_path / "train.csv")
    assert pairs == [(tmp_path / "imgs/0.png", "a red thing"), (tmp_path / "imgs/1.png", "a, comma")]


def test_tsv_and_custom_keys(tmp_path):
    (tmp_path / "d.tsv").write_text("img\tcap\n/abs/x.png\thello\n")
    assert read_csv(tmp_path / "d.tsv", "img", "cap") == [(Path("/abs/x.png"), "hello")]
    with pytest.raises(DataError, match="no column 'filepath'"):
        read_csv(tmp_path / "d.tsv")


def test_jsonl_and_its_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"filepath": "a.png", "title": "x"}) + "\n\n")
    assert read_jsonl(p) == [(tmp_path / "a.png", "x")]
    p.write_text('{"filepath": "a.png"}\n')
    with pytest.raises(DataError, match="d.jsonl:1"):
        read_jsonl(p)


def test_folder_with_same_named_captions(tmp_path):
    d = _images(tmp_path, 3)
    (d / "0.txt").write_text("zero\n")
    (d / "2.txt").write_text("two")
    assert read_folder(d) == [(d / "0.png", "zero"), (d / "2.png", "two")]
    with pytest.raises(DataError):
        read_folder(tmp_path / "imgs" / "nothing-here")


def test_detect_type(tmp_path):
    assert detect_type("shards/s-{000..009}.tar") == "webdataset"
    assert detect_type(str(tmp_path)) == "folder"
    assert detect_type("x.tsv") == "csv" and detect_type("x.jsonl") == "jsonl"
    with pytest.raises(DataError, match="--dataset-type"):
        detect_type("x.parquet")


def test_brace_expansion():
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]
    assert expand_braces("x.tar::y-{8..10}.tar") == ["x.tar", "y-8.tar", "y-9.tar", "y-10.tar"]


def test_epoch_order_is_seeded_split_across_ranks_and_skippable():
    s0 = EpochBatchSampler(20, 3, seed=5, rank=0, world_size=2)
    s1 = EpochBatchSampler(20, 3, seed=5, rank=1, world_size=2)
    assert len(s0) == 3  # 10 per rank -> 3 full batches
    a, b = [i for batch in s0 for i, _ in batch], [i for batch in s1 for i, _ in batch]
    assert not set(a) & set(b) and len(a) == len(b) == 9
    first = list(s0)
    s0.set_epoch(0, skip=1)
    assert list(s0) == first[1:]
    s0.set_epoch(1)
    assert [i for i, _ in list(s0)[0]] != [i for i, _ in first[0]]  # a new order each epoch
    assert (
        EpochBatchSampler(20, 3, seed=5).__iter__().__next__()
        == EpochBatchSampler(20, 3, seed=5).__iter__().__next__()
    )
    with pytest.raises(DataError, match="lower --batch-size"):
        EpochBatchSampler(5, 4, world_size=2)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    d = _images(tmp_path, 4)
    (d / "broken.png").write_bytes(b"\x89PNG not really")
    (d / "empty.jpg").write_bytes(b"")
    pairs = [
        (d / "0.png", "a"),
        (d / "broken.png", "b"),
        (d / "1.png", "c"),
        (d / "missing.png", "d"),
        (d / "empty.jpg", "e"),
    ]
    ds = PairDataset(pairs, transform, tokenizer)
    batch = collate([ds[(i, 0)] for i in range(len(pairs))])
    assert len(batch) == 2
    assert sum(batch.skipped.values()) == 3
    assert collate([Skip("x")]).images.shape[0] == 0


def test_augmentation_depends_on_sample_and_epoch_not_on_call_order(tmp_path):
    d = _images(tmp_path, 2)
    ds = PairDataset([(d / "0.png", "a"), (d / "1.png", "b")], transform, tokenizer, seed=3)
    x1 = ds[(1, 0)][0]
    ds[(0, 0)]
    torch.rand(5)  # disturbing the global RNG changes nothing
    assert torch.equal(ds[(1, 0)][0], x1)
    assert not torch.equal(ds[(1, 1)][0], x1)


def test_loader_over_csv_with_workers(tmp_path):
    _images(tmp_path, 6)
    rows = "".join(f"imgs/{i}.png,caption {i}\n" for i in range(6)) + "imgs/none.png,gone\n"
    (tmp_path / "t.csv").write_text("filepath,title\n" + rows)
    data = make_loader(
        str(tmp_path / "t.csv"), transform=transform, tokenizer=tokenizer, batch_size=7, workers=1
    )
    batches = list(data.loader)
    assert len(batches) == data.batches_per_epoch == 1
    assert isinstance(batches[0], Batch) and len(batches[0]) == 6
    assert sum(batches[0].skipped.values()) == 1


def test_loader_workers_persist_and_epochs_still_differ(tmp_path):
    # the workers outlive an epoch; each epoch's order and crops still follow (seed, epoch), as
    # without workers
    _images(tmp_path, 6)
    rows = "".join(f"imgs/{i}.png,caption {i}\n" for i in range(6))
    (tmp_path / "t.csv").write_text("filepath,title\n" + rows)

    def epochs(workers):
        data = make_loader(
            str(tmp_path / "t.csv"), transform=transform, tokenizer=tokenizer, batch_size=3, workers=workers
        )
        out = []
        for epoch in range(2):
            data.set_epoch(epoch, 0)
            out.append([(b.images, b.texts) for b in data.loader])
        return data, out

    data, with_workers = epochs(1)
    assert data.loader.persistent_workers
    _, in_process = epochs(0)
    for a, b in zip(with_workers, in_process, strict=True):
        for (ia, ta), (ib, tb) in zip(a, b, strict=True):
            assert torch.equal(ia, ib) and torch.equal(ta, tb)
    assert not torch.equal(with_workers[0][0][0], with_workers[1][0][0])


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_unsafe_tar_member_paths_are_rejected():
    for bad in ("../evil.txt", "a/../../x.png", "/etc/passwd", "C:/x.png", "..\\x.txt"):
        assert not safe_member_name(bad)
    assert safe_member_name("dir/000.jpg") and safe_member_name("a..b.txt")


def test_webdataset_shards_stream_and_count(tmp_path):
    _tar(
        tmp_path / "s-0.tar",
        [
            ("000.png", _png()),
            ("000.txt", b"red"),
            ("../001.png", _png()),
            ("001.txt", b"escaped"),
            ("002.png", b"garbage"),
            ("002.txt", b"bad"),
        ],
    )
    _tar(tmp_path / "s-1.tar", [("sub/003.png", _png()), ("sub/003.txt", b"blue"), ("/abs.txt", b"x")])
    with open(tmp_path / "s-0.tar", "rb") as f:
        samples = list(iter_tar_samples(f))
    # the rejected member is reported as soon as it is met, before the sample still being gathered
    assert [s["__key__"] if isinstance(s, dict) else s for s in samples] == [
        Skip("unsafe_path"),
        "000",
        "001",
        "002",
    ]
    assert not (tmp_path.parent / "001.png").exists()  # nothing is extracted
    urls = expand_braces(str(tmp_path / "s-{0..1}.tar"))
    assert count_tar_samples(urls) == 4
    ds = WebDatasetShards(urls, transform, tokenizer, seed=0, shuffle_buffer=0)
    out = []
    for s in ds:
        out.append(s)
        if len(out) == 6:  # one pass over both shards: 4 + 2 items
            break
    reasons = Counter(s.reason for s in out if isinstance(s, Skip))
    assert reasons["unsafe_path"] == 2
    assert reasons["incomplete_sample"] == 1  # 001.txt without its (rejected) image
    assert sum(reasons.values()) == 4  # and the undecodable 002.png
    assert sum(not isinstance(s, Skip) for s in out) == 2


def test_shards_split_across_ranks_and_workers(tmp_path):
    urls = [str(tmp_path / f"s{i}.tar") for i in range(8)]
    for u in urls:
        _tar(u, [("0.txt", b"x")])
    ranks = [WebDatasetShards(urls, transform, tokenizer, seed=1, rank=r, world_size=2) for r in range(2)]
    parts = [set(ds.my_shards(w, 2)) for ds in ranks for w in range(2)]
    assert all(len(p) == 2 for p in parts) and set.union(*parts) == set(urls)
    assert sum(len(p) for p in parts) == 8
    with pytest.raises(DataError, match="none of the 1 shards exists"):
        WebDatasetShards([str(tmp_path / "nope.tar")], transform, tokenizer)


def test_webdataset_loader(tmp_path):
    members = []
    for i in range(6):
        members += [(f"{i:03d}.png", _png()), (f"{i:03d}.txt", f"c{i}".encode())]
    _tar(tmp_path / "a.tar", members)
    data = make_loader(str(tmp_path / "a.tar"), transform=transform, tokenizer=tokenizer, batch_size=3)
    assert data.batches_per_epoch == 2 and data.skip_in_loader
    it = iter(data.loader)
    assert len(next(it)) == 3


def test_shuffle_buffer_is_a_seeded_permutation_that_moves_items_far():
    items = list(range(200))
    a = list(shuffled(iter(items), 50, torch.Generator().manual_seed(1)))
    b = list(shuffled(iter(items), 50, torch.Generator().manual_seed(1)))
    c = list(shuffled(iter(items), 50, torch.Generator().manual_seed(2)))
    assert sorted(a) == items and a == b and a != c
    assert max(abs(pos - item) for pos, item in enumerate(a)) > 40  # mixed across the whole buffer
    assert list(shuffled(iter(items), 0, torch.Generator())) == items


def _shards(tmp_path, n_shards=2, per_shard=6):
    urls = []
    for s in range(n_shards):
        members = []
        for i in range(per_shard):
            key = f"{s}{i:02d}"
            members += [(f"{key}.png", _png()), (f"{key}.txt", key.encode())]
        urls.append(str(tmp_path / f"s{s}.tar"))
        _tar(urls[-1], members)
    return urls


def _captions(ds, n):
    out = []
    for sample in ds:
        if not isinstance(sample, Skip):
            out.append("".join(chr(c) for c in sample[1].tolist() if c))
        if len(out) == n:
            return out


def test_samples_mix_across_shards_and_change_order_every_epoch(tmp_path):
    urls = _shards(tmp_path)
    ds = WebDatasetShards(urls, transform, tokenizer, seed=0, shuffle_buffer=8)
    first = _captions(ds, 12)
    assert {c[0] for c in first[:6]} == {"0", "1"}  # both shards within the first half
    assert set(first) <= {f"{s}{i:02d}" for s in "01" for i in range(6)}
    ds.set_epoch(1)
    assert _captions(ds, 12) != first
    ds.set_epoch(0)
    assert _captions(ds, 12) == first  # a function of (seed, epoch): resumable


def test_a_missing_or_corrupt_shard_is_skipped_warned_and_counted(tmp_path, caplog):
    urls = _shards(tmp_path, n_shards=1)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, format="PNG")
    _tar(tmp_path / "whole.tar", [("big.png", buf.getvalue()), ("big.txt", b"big")])
    (tmp_path / "bad.tar").write_bytes((tmp_path / "whole.tar").read_bytes()[:4000])  # cut inside the PNG
    urls += [str(tmp_path / "gone.tar"), str(tmp_path / "bad.tar")]
    ds = WebDatasetShards(urls, transform, tokenizer, seed=0, shuffle_buffer=0)
    out = []
    for s in ds:
        out.append(s)
        if sum(not isinstance(x, Skip) for x in out) >= 6 and len(out) > 8:
            break
    reasons = Counter(s.reason for s in out if isinstance(s, Skip))
    assert reasons["missing_shard"] >= 1 and reasons["corrupt_shard"] >= 1
    assert "gone.tar" in caplog.text and "bad.tar" in caplog.text
    assert count_tar_samples(urls) >= 6  # counting survives them too


def test_resampled_shards_draw_with_replacement_and_need_a_sample_count(tmp_path):
    urls = _shards(tmp_path, n_shards=3, per_shard=1)
    ds = WebDatasetShards(urls, transform, tokenizer, seed=0, shuffle_buffer=0, resampled=True)
    drawn = _captions(ds, 30)
    assert set(drawn) == {"000", "100", "200"} and len(drawn) == 30
    with pytest.raises(DataError, match="--train-num-samples"):
        make_loader(str(tmp_path / "s{0..2}.tar"), transform=transform, tokenizer=tokenizer, batch_size=2,
                    resampled=True)  # fmt: skip
    data = make_loader(str(tmp_path / "s{0..2}.tar"), transform=transform, tokenizer=tokenizer, batch_size=2,
                       resampled=True, num_samples=8)  # fmt: skip
    assert data.batches_per_epoch == 4


def test_every_rank_takes_the_same_number_of_batches(tmp_path):
    urls = _shards(tmp_path, n_shards=3, per_shard=5)  # 15 samples
    sizes = [
        make_loader(";".join(urls).replace(";", "::"), transform=transform, tokenizer=tokenizer, batch_size=2,
                    rank=r, world_size=2).batches_per_epoch
        for r in range(2)
    ]  # fmt: skip
    assert sizes == [3, 3]  # 15 // (2 x 2): 12 samples an epoch, exactly, whatever each rank's shards hold


def test_non_utf8_captions_and_file_names_are_read_and_a_bad_caption_is_skipped(tmp_path):
    # A Latin-1 file name listed in the CSV opens (names are bytes on disk); a Latin-1 caption is a
    # bad sample (skipped and counted, as in tar shards), never a UnicodeDecodeError for the whole run.
    d = _images(tmp_path, 2)
    name = "caf\xe9.png".encode("latin-1")
    (tmp_path / "imgs").joinpath(name.decode("utf-8", "surrogateescape")).write_bytes(_png())
    (tmp_path / "t.csv").write_bytes(b"filepath,title\nimgs/" + name + b",a cafe\nimgs/0.png,caf\xe9\n")
    pairs = read_csv(tmp_path / "t.csv")
    ds = PairDataset(pairs, transform, tokenizer)
    assert not isinstance(ds[0], Skip) and ds[1] == Skip("bad_caption")
    (tmp_path / "t.jsonl").write_bytes(b'{"filepath": "imgs/0.png", "title": "caf\xe9"}\n')
    assert PairDataset(read_jsonl(tmp_path / "t.jsonl"), transform, tokenizer)[0] == Skip("bad_caption")
    (d / "0.txt").write_bytes(b"caf\xe9")
    (d / "1.txt").write_text("one")
    ds = PairDataset(read_folder(d), transform, tokenizer)
    assert [isinstance(ds[i], Skip) for i in range(2)] == [True, False]


def test_a_short_csv_row_is_a_bad_sample_not_a_crash(tmp_path):
    _images(tmp_path, 1)
    (tmp_path / "t.csv").write_text("title,filepath\na red thing,imgs/0.png\nno path here\n")
    pairs = read_csv(tmp_path / "t.csv")
    assert len(pairs) == 2 and pairs[1][1] == "no path here"
    assert isinstance(PairDataset(pairs, transform, tokenizer)[1], Skip)
    (tmp_path / "u.csv").write_text("filepath,title\nimgs/0.png\n")
    assert read_csv(tmp_path / "u.csv")[0][1] == ""  # not the caption "None"


def test_a_missing_shard_counts_once_and_does_not_crowd_out_the_samples(tmp_path):
    # A missing shard was a Skip on every visit: while the shuffle buffer filled with the good shard's
    # samples, the cycled missing shard filled every batch with Skips, so a run trained no step.
    urls = _shards(tmp_path, n_shards=1, per_shard=4) + [str(tmp_path / "gone.tar")]
    ds = WebDatasetShards(urls, transform, tokenizer, seed=0, shuffle_buffer=100)
    out = []
    for s in ds:
        out.append(s)
        if len(out) == 8:
            break
    assert Counter(s.reason for s in out if isinstance(s, Skip)) == {"missing_shard": 1}
    assert sum(not isinstance(s, Skip) for s in out) == 7
