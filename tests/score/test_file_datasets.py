"""Issue 21: the user's own data (npy, npz, HDF5, image folders, HF datasets) scored through `hvae score`, bad
data refused with one line and nothing written, seeded stratified subsets, provenance in the score file and
the in-memory entry point."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from helpers.score import hvae_cli, make_run_dir, read_groups
from hvae_dist.checkpoint import save_checkpoint
from hvae_dist.cli import main as hvae
from hvae_dist.data import load_arrays, open_dataset, parse_spec, select_rows
from hvae_dist.errors import ConfigError

N = 24


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def fm():
    images, labels = load_arrays("FashionMNIST", "test")
    return np.array(images[:N]), np.array(labels[:N])


@pytest.fixture(scope="module")
def files(tmp_path_factory, fm):
    """The first N FashionMNIST test images as .npy, .npz (two keys + labels), .h5 and a PNG folder with two
    class subfolders and one non-image file."""
    d = tmp_path_factory.mktemp("files")
    images, labels = fm
    np.save(d / "fm.npy", images[:, 0])                                          # N, H, W uint8
    np.savez(d / "two.npz", x=images.transpose(0, 2, 3, 1), other=images[:, 0] / 255.0, labels=labels)
    with h5py.File(d / "fm.h5", "w") as f:
        f.create_dataset("data/images", data=images)                              # N, 1, H, W
        f.create_dataset("data/labels", data=labels)
    for i in range(N):
        sub = d / "pngs" / ("b_odd" if i % 2 else "a_even")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i, 0]).save(sub / f"{i:03d}.png")
    (d / "pngs" / "notes.txt").write_text("not an image")
    return d


def _score(run_dir, out, *datasets, extra=()):
    return hvae(["score", "--run-dir", str(run_dir), "--datasets", *datasets, "--iw-samples", "3", "--out", str(out),
                 "--no-progress", *extra])


def test_specs_parse_paths_keys_splits_variants_and_group_names(tmp_path):
    s = parse_spec(f"{tmp_path}/x.npz#imgs:validation-32x32-rgb")
    assert (s.is_file, s.path, s.key, s.split, s.variants) == (True, f"{tmp_path}/x.npz", "imgs", "validation",
                                                                ("32x32", "rgb"))
    assert s.group == "x.npz#imgs-32x32-rgb/validation"
    assert parse_spec(f"{tmp_path}/a.h5#/g/images").group == "a.h5#g.images/all"
    assert parse_spec(f"mine={tmp_path}/pngs").group == "mine/all"
    assert parse_spec(f"FashionMNIST/test={tmp_path}/fm.npy").group == "FashionMNIST/test"
    assert not parse_spec("MNIST-inverted:test").is_file
    with pytest.raises(ConfigError, match="no 'test' split"):
        parse_spec(f"{tmp_path}/x.npy:test")
    with pytest.raises(ConfigError, match="path to your own data"):
        parse_spec("mypngs:test")


def test_every_format_gives_the_same_rows_labels_and_paths(files, fm):
    images, labels = fm
    cases = {"fm.npy": -1, "two.npz#x": labels, "two.npz#other": labels, "fm.h5#/data/images": labels, "pngs": None}
    for spec, want_labels in cases.items():
        ds = open_dataset(str(files / spec))
        if spec == "pngs":   # sorted: a_even/000, 002, ..., then b_odd/001, 003, ...
            order = np.r_[np.arange(0, N, 2), np.arange(1, N, 2)]
            assert np.array_equal(ds.images[np.arange(N)], images[order])
            assert ds.labels.tolist() == [0] * (N // 2) + [1] * (N // 2)
            assert ds.paths[0] == b"a_even/000.png" and ds.classes == ["a_even", "b_odd"]
            continue
        assert len(ds) == N and ds.shape == (1, 28, 28)
        assert np.array_equal(ds.images[np.arange(N)], images), spec
        assert np.array_equal(ds.labels, np.broadcast_to(want_labels, (N,)))
    val = open_dataset(f"{files}/fm.npy:validation-inverted")
    assert len(val) == N // 10 and np.array_equal(val.images[np.arange(len(val))], 255 - images[N - N // 10:])


def test_hf_save_to_disk_dataset(tmp_path, fm):
    datasets = pytest.importorskip("datasets")
    images, labels = fm
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a[0]) for a in images], "label": labels.tolist()},
                                    features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    got = open_dataset(str(tmp_path / "hf"))
    assert np.array_equal(got.images[np.arange(N)], images) and np.array_equal(got.labels, labels)
    ds.to_parquet(str(tmp_path / "x.parquet"))
    got = open_dataset(str(tmp_path / "x.parquet"))
    assert np.array_equal(got.images[np.arange(N)], images) and got.source_sha256


def test_file_scores_equal_registry_scores_bitwise_and_store_provenance(run_dir, files, fm, tmp_path):
    assert _score(run_dir, tmp_path / "reg", "FashionMNIST:test", extra=["--first", str(N)]) == 0
    assert _score(run_dir, tmp_path / "file", f"FashionMNIST/test={files}/fm.npy", f"{files}/pngs",
                  f"{files}/two.npz#x", f"{files}/fm.h5#/data/images") == 0
    reg = read_groups(tmp_path / "reg" / "shard-00000-of-00001.h5")
    got = read_groups(tmp_path / "file" / "shard-00000-of-00001.h5")
    for key in ("elbo", "lk", "llr", "kl", "index"):    # same group name -> same noise key -> the same bits
        assert np.array_equal(reg.groups["FashionMNIST/test"][key], got.groups["FashionMNIST/test"][key]), key
    # another group name draws other noise: close to, but not, the same bounds; every format gives equal rows
    a, b = got.groups["two.npz#x/all"]["elbo"], got.groups["fm.h5#data.images/all"]["elbo"]
    assert np.array_equal(got.groups["two.npz#x/all"]["label"], fm[1]) and not np.array_equal(a, b)
    pngs = got.groups["pngs/all"]
    assert pngs["path"][1] == b"a_even/002.png" and pngs["label"].tolist() == [0] * (N // 2) + [1] * (N // 2)
    assert reg.groups["FashionMNIST/test"]["label"].tolist() == fm[1].tolist()
    with h5py.File(tmp_path / "file" / "shard-00000-of-00001.h5") as f:
        assert f["pngs/all"].attrs["source"] == str(files / "pngs")
        assert f["pngs/all"]["path"].fletcher32
        assert len(f["fm.h5#data.images/all"].attrs["source_sha256"]) == 64
    attrs = got.attrs
    assert attrs["checkpoint_step"] == 1 and attrs["checkpoint_file"] == "step-1.pt"
    assert attrs["source_sizes"]["pngs/all"] == N
    assert hvae(["merge", str(tmp_path / "file")]) == 0
    merged = read_groups(tmp_path / "file" / "scores.h5")
    assert merged.groups["pngs/all"]["path"].tolist() == pngs["path"].tolist()
    assert hvae(["analyze", str(tmp_path / "file" / "scores.h5"), "--in-dist", f"{files}/pngs", "--no-plots"]) == 0
    report = (tmp_path / "file" / "analysis" / "metrics.md").read_text()
    assert "- checkpoint_step: 1" in report and "- checkpoint_file: step-1.pt" in report
    logged = [json.loads(x) for x in (run_dir / "score-files.jsonl").read_text().splitlines()]
    assert any(e["checkpoint_file"] == "step-1.pt" for e in logged)


def _bad_cases(d: Path, fm) -> dict[str, tuple[str, str]]:
    """name -> (spec, a word the one-line message must hold); each written under d."""
    images = fm[0][:6, 0]
    d.mkdir(parents=True, exist_ok=True)
    cases = {}
    (d / "mixed").mkdir()
    for i in range(3):
        Image.fromarray(images[i] if i != 1 else np.zeros((20, 20), np.uint8)).save(d / "mixed" / f"{i}.png")
    cases["mixed sizes"] = (str(d / "mixed"), "mixed/1.png")
    (d / "rgb").mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(d / "rgb" / "0.png")
    cases["channels"] = (str(d / "rgb"), "(3, 28, 28)")
    (d / "empty").mkdir()
    cases["empty folder"] = (str(d / "empty"), "empty")
    (d / "noimg").mkdir()
    (d / "noimg" / "a.txt").write_text("x")
    cases["no images"] = (str(d / "noimg"), "no images")
    (d / "broken").mkdir()
    Image.fromarray(images[0]).save(d / "broken" / "0.png")
    (d / "broken" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    cases["unreadable"] = (str(d / "broken"), "broken/1.png")
    (d / "trunc").mkdir()
    Image.fromarray(images[0]).save(d / "trunc" / "0.png")
    (d / "trunc" / "1.png").write_bytes((d / "trunc" / "0.png").read_bytes()[:-30])
    cases["truncated"] = (str(d / "trunc"), "trunc/1.png")
    nan = images / 255.0
    nan[4, 3, 3] = np.nan
    np.save(d / "nan.npy", nan)
    cases["NaN"] = (str(d / "nan.npy"), "row 4")
    np.save(d / "range.npy", images / 255.0 * 1.5)
    cases["float out of range"] = (str(d / "range.npy"), "[0, 1]")
    big = images.astype(np.int32)
    big[2, 0, 0] = 300
    np.save(d / "big.npy", big)
    cases["int above 255"] = (str(d / "big.npy"), "row 2 holds 300")
    np.savez(d / "k.npz", a=images, b=images)
    cases["missing npz key"] = (str(d / "k.npz") + "#c", "a, b")
    cases["two npz arrays, no key"] = (str(d / "k.npz"), "#KEY")
    np.save(d / "amb.npy", np.zeros((4, 3, 5, 3), np.uint8))
    cases["ambiguous shape"] = (str(d / "amb.npy"), "ambiguous")
    np.save(d / "small.npy", np.zeros((4, 20, 20), np.uint8))
    cases["size vs model"] = (str(d / "small.npy"), "-28x28")
    cases["missing file"] = (str(d / "nope.npy"), "no such file")
    cases["test split of a file"] = (str(d / "small.npy") + ":test", "no 'test' split")
    with h5py.File(d / "x.h5", "w") as f:
        f.create_dataset("a", data=images[:, None])
    cases["missing h5 dataset"] = (str(d / "x.h5") + "#/b", "/a")
    return cases


def test_every_bad_data_case_exits_2_with_one_line_and_writes_nothing(run_dir, tmp_path, fm):
    cases = _bad_cases(tmp_path / "bad", fm)
    assert len(cases) >= 16
    for name, (spec, word) in cases.items():
        out = tmp_path / "out" / name.replace(" ", "_")
        out.mkdir(parents=True)
        proc = hvae_cli("score", "--run-dir", str(run_dir), "--datasets", spec, "--iw-samples", "2", "--out", str(out),
                        check=False)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(lines) == 1 and lines[0].startswith("hvae score: error:"), (name, proc.stderr)
        assert word in lines[0], (name, lines[0])
        assert not any(out.iterdir()), (name, list(out.iterdir()))


def test_max_examples_is_a_seeded_stratified_subset_and_first_keeps_the_first_rows(run_dir, tmp_path):
    _, labels = load_arrays("AnimalMNIST", "test")
    assert (labels[:100] == 0).all()                         # sorted by class: the old first-N covered one class
    rows = select_rows(labels, 100, seed=0, group="AnimalMNIST/test")
    assert np.array_equal(rows, select_rows(labels, 100, seed=0, group="AnimalMNIST/test"))
    assert not np.array_equal(rows, select_rows(labels, 100, seed=1, group="AnimalMNIST/test"))
    assert np.array_equal(select_rows(labels, 100, mode="first"), np.arange(100))
    assert _score(run_dir, tmp_path / "a", "AnimalMNIST:test", extra=["--max-examples", "100", "--num-shards", "2",
                                                                        "--shard", "0"]) == 0
    assert _score(run_dir, tmp_path / "a", "AnimalMNIST:test", extra=["--max-examples", "100", "--num-shards", "2",
                                                                        "--shard", "1"]) == 0
    assert hvae(["merge", str(tmp_path / "a")]) == 0
    g = read_groups(tmp_path / "a" / "scores.h5").groups["AnimalMNIST/test"]
    assert np.array_equal(g["index"], rows) and len(np.unique(g["label"])) >= 8
    assert np.array_equal(g["label"], labels[rows])
    # a row's scores do not depend on the subset it is in: --first 100 scores rows 0..99 with the same noise
    assert _score(run_dir, tmp_path / "f", "AnimalMNIST:test", extra=["--first", "100"]) == 0
    f = read_groups(tmp_path / "f" / "shard-00000-of-00001.h5").groups["AnimalMNIST/test"]
    both = np.intersect1d(rows, np.arange(100))
    assert np.array_equal(g["elbo"][np.searchsorted(rows, both)], f["elbo"][both])
    proc = hvae_cli("score", "--run-dir", str(run_dir), "--datasets", "AnimalMNIST:test", "--out", str(tmp_path),
                    "--first", "3", "--max-examples", "3", check=False)
    assert proc.returncode == 2 and "exclude each other" in proc.stderr


def test_score_arrays_writes_a_normal_score_file(run_dir, tmp_path, fm):
    from hvae_dist.analysis import analyze
    from hvae_dist.score.arrays import score_arrays

    images, labels = fm
    path = score_arrays(run_dir, {"FashionMNIST/test": (images, labels), "noise": np.random.default_rng(0).random((N, 28, 28))},
                        tmp_path / "arr", iw_samples=3)
    assert _score(run_dir, tmp_path / "reg", "FashionMNIST:test", extra=["--first", str(N)]) == 0
    reg = read_groups(tmp_path / "reg" / "shard-00000-of-00001.h5").groups["FashionMNIST/test"]
    got = read_groups(path)
    assert np.array_equal(got.groups["FashionMNIST/test"]["elbo"], reg["elbo"])
    assert got.groups["noise/all"]["label"].tolist() == [-1] * N
    rows = analyze(path, "FashionMNIST:test")
    assert {r["ood"] for r in rows} == {"noise/all"}


def test_keep_last_pruning_warns_about_a_scored_checkpoint(tmp_path):
    run = make_run_dir(tmp_path / "run", step=1)
    assert _score(run, tmp_path / "s", "FashionMNIST:test", extra=["--first", "2"]) == 0
    state = {"step": 2, "epoch": 0, "batch_in_epoch": 0, "model": {}, "config": {}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_checkpoint({**state, "step": 2}, run, keep_last=1)
    assert any("step-1.pt" in str(w.message) and "score file" in str(w.message) for w in caught)
    assert not (run / "checkpoints" / "step-1.pt").exists()
