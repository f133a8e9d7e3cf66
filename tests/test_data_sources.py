"""The data sources beyond a folder: the ``webdataset`` (plugins/shards.py) and ``hf_datasets``
(plugins/hf_datasets.py) dataset plugins and the stream both use (plugins/_streaming.py).

The data is written here, into temporary folders, with the real libraries: 64 committed MNIST digits as PNG
bytes in 8 tar shards of 8 (webdataset's ShardWriter), as a saved Arrow dataset (``save_to_disk``) and as
loose Arrow files (read by ``load_dataset(..., streaming=True)``, a stream with no random access). Each image
carries its number (``.id`` / column ``id``), so a test can say which images a rank or a resume saw. The
dataset contract (tests/test_contract_datasets.py) runs both plugins too.

Fast tests read the streams through real DataLoaders with worker processes; the ``slow`` ones train the MNIST
and RGB recipes by plugin name in one process and as a real 2-process gloo run interrupted and resumed.
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
import shutil
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from conftest import MNIST_ROOT, TINY, assert_resume_is_exact, write_digit_pngs
from processes import ENV, assert_same_weights, finish, recipe, side_by_side, start
from torch.utils.data import DataLoader

from vaegan.data import image_folder, is_stream
from vaegan.errors import DataError

HAS_HF = importlib.util.find_spec("datasets") is not None
HAS_WDS = importlib.util.find_spec("webdataset") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="the datasets package is not installed (pip install 'vaegan[hf]')")
needs_wds = pytest.mark.skipif(not HAS_WDS, reason="the webdataset package is not installed "
                                                   "(pip install 'vaegan[webdataset]')")

N, PER_SHARD = 64, 8
SHARDS = "d-{000000..000007}.tar"
SHAPE = (1, 24, 24)  # from 28 x 28 digits: room for a random crop
AUGMENT = {"random_flip": True, "crop": "random"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _png(array) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(folder: Path, samples, per_shard: int = PER_SHARD, prefix: str = "d") -> None:
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / f"{prefix}-%06d.tar"), maxcount=per_shard, verbose=0) as sink:
        for sample in samples:
            sink.write(sample)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The data root: ``d-00000N.tar`` (8 shards), ``arrow/`` (saved dataset), ``files/`` (4 loose Arrow files)."""
    from torchvision.datasets import MNIST

    root = tmp_path_factory.mktemp("sources")
    mnist = MNIST(str(MNIST_ROOT), train=True, download=False)
    pngs = [_png(d.numpy()) for d in mnist.data[:N]]
    labels = [int(t) for t in mnist.targets[:N]]
    if HAS_WDS:
        _write_shards(root, [{"__key__": f"{i:06d}", "png": b, "cls": str(c).encode(), "id": str(i).encode()}
                             for i, (b, c) in enumerate(zip(pngs, labels))])
    if HAS_HF:
        import datasets

        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64"),
                                      "id": datasets.Value("int64")})
        table = datasets.Dataset.from_dict({"image": [{"bytes": b, "path": None} for b in pngs], "label": labels,
                                            "id": list(range(N))}, features=features)
        table.save_to_disk(str(root / "arrow"))
        table.save_to_disk(str(root / "tmp"), num_shards=4)
        (root / "files").mkdir()
        for f in sorted((root / "tmp").glob("*.arrow")):  # the Arrow files alone: a dataset of data files
            shutil.move(str(f), root / "files" / f.name)
        shutil.rmtree(root / "tmp")
    return root


def _source(name: str, root: Path, **options):
    """A stream of the digits with their numbers as labels: ``webdataset``, ``hf-table`` (a saved dataset,
    streamed), ``hf-files`` (Arrow files streamed, no random access)."""
    if name == "webdataset":
        from vaegan_plugins.shards import webdataset

        return webdataset(str(root), "train", False, None, SHAPE, (0.0, 1.0), shards=SHARDS, label_key="id",
                          shuffle_buffer=8, **options)
    from vaegan_plugins.hf_datasets import hf_datasets

    where = {"hf-table": {"path": "arrow"}, "hf-files": {"path": "files", "num_images": N}}[name]
    return hf_datasets(str(root), "train", False, None, SHAPE, (0.0, 1.0), label_column="id", streaming=True,
                       shuffle_buffer=8, **where, **options)


STREAMS = [pytest.param("webdataset", marks=needs_wds), pytest.param("hf-table", marks=needs_hf),
           pytest.param("hf-files", marks=needs_hf)]


def _epoch(loader, epoch: int):
    loader.dataset.set_epoch(epoch)
    batches = list(loader)
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]).tolist(), len(batches)


@pytest.mark.parametrize("name", STREAMS)
def test_an_epoch_is_split_across_ranks_and_workers_and_resumes_exactly(data, name):
    """Two ranks of two data workers each: every image once per epoch, no image on both ranks, the same number
    of batches on each, another order the next epoch; a resume at batch 3 gives the rest of the epoch's batches,
    random crops and flips included."""
    seen, counts, order = {}, {}, {}
    for rank in (0, 1):
        ds = _source(name, data, **AUGMENT)
        assert is_stream(ds) and len(ds) == N
        ds.bind(rank=rank, world=2, batch_size=4, workers=2, seed=0)
        loader = DataLoader(ds, batch_size=4, num_workers=2, drop_last=True, persistent_workers=True)
        images, seen[rank], counts[rank] = _epoch(loader, 0)
        order[rank] = _epoch(loader, 1)[1]
        if rank == 1:
            ds.start_at(0, 3)
            resumed, ids, _ = _epoch(loader, 0)
            assert ids == seen[1][12:] and torch.equal(resumed, images[12:]), "the resume does not continue the epoch"
    assert counts[0] == counts[1] == N // 8
    assert not set(seen[0]) & set(seen[1]), "an image was read by both ranks in one epoch"
    assert sorted(seen[0] + seen[1]) == list(range(N))
    assert sorted(order[0] + order[1]) == list(range(N)) and order[0] != seen[0]


@needs_wds
def test_a_resume_without_data_workers_reads_the_rest_of_the_epoch(data):
    """The main process as the only reader (data.num_workers 0): a resume at batch 5 yields the other 11."""
    ds = _source("webdataset", data)
    ds.bind(rank=0, world=1, batch_size=4, workers=0, seed=0)
    ds.start_at(0, 5)
    ds.set_epoch(0)  # as the trainer's loader does before each epoch
    assert len(list(DataLoader(ds, batch_size=4, drop_last=True))) == N // 4 - 5


@pytest.mark.parametrize("name", STREAMS)
def test_random_access_and_a_plain_loader_read_the_index_order(data, name):
    ds = _source(name, data)
    assert ds.random_access == (name != "hf-files")
    ids = [ds[i][1] for i in (0, 1, 2)]
    assert ids == [0, 1, 2]
    first = next(iter(DataLoader(ds, batch_size=3)))  # not bound to a training loader: index order
    assert first[1].tolist() == ids and torch.equal(first[0], torch.stack([ds[i][0] for i in range(3)]))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("name", STREAMS)
def test_a_plain_loader_over_a_bound_stream_reads_every_image_in_index_order(data, name, workers):
    """What vaegan.codec.encode does to fit a sampler at the end of training (or for an evaluation mid-epoch):
    every rank encodes all the images, alike, not its training part."""
    ds = _source(name, data)
    ds.bind(rank=1, world=2, batch_size=4, workers=workers, seed=0)
    training = DataLoader(ds, batch_size=4, num_workers=workers, drop_last=True)
    ds.set_epoch(0)
    batches = iter(training)
    part = next(batches)[1].tolist()
    assert torch.cat([b[1] for b in DataLoader(ds, batch_size=10)]).tolist() == list(range(N))
    rest = torch.cat([b[1] for b in batches]).tolist()  # the training epoch goes on where it was
    assert len(part + rest) == N // 2 and len(set(part + rest)) == N // 2


@needs_hf
def test_a_map_style_dataset_is_split_by_the_trainers_sampler(data):
    from vaegan_plugins.hf_datasets import ArrowImages, hf_datasets

    ds = hf_datasets(str(data), "train", False, 10, SHAPE, (0.0, 1.0), path="arrow", label_column="label")
    assert isinstance(ds, ArrowImages) and not is_stream(ds) and len(ds) == 10
    assert isinstance(ds[3][1], int)


# ---- the one-liners that turn a folder into shards or a dataset ------------------------------------------


@needs_wds
@needs_hf
def test_a_folder_written_as_shards_or_a_dataset_reads_as_the_folder(tmp_path, caplog):
    """``python -m vaegan_plugins.shards`` / ``.hf_datasets``: the same images, decoded identically, and the line
    that says how to train on them."""
    import logging

    from vaegan_plugins import hf_datasets as hf
    from vaegan_plugins import shards

    folder = write_digit_pngs(tmp_path / "digits" / "a", 6)
    write_digit_pngs(tmp_path / "digits" / "b", 3)
    with caplog.at_level(logging.INFO, logger="vaegan_plugins"):
        shards.main([str(tmp_path / "digits"), str(tmp_path / "shards"), "--per-shard", "4", "--labels",
                     "--no-shuffle"])
        assert "data.options.shards: 'shards-{000000..000002}.tar'" in caplog.text
        assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [f"shards-00000{i}.tar" for i in range(3)]
        hf.main([str(tmp_path / "digits"), str(tmp_path / "saved"), "--labels"])
        assert f"data.name: hf_datasets, data.root: {tmp_path / 'saved'}" in caplog.text
    reference = image_folder(str(folder.parent), "train", False, None, (3, 16, 16), (-1.0, 1.0))
    from_shards = shards.webdataset(str(tmp_path / "shards"), "train", False, None, (3, 16, 16), (-1.0, 1.0),
                                    shards="shards-{000000..000002}.tar", label_key="cls")
    from_hf = hf.hf_datasets(str(tmp_path / "saved"), "train", False, None, (3, 16, 16), (-1.0, 1.0),
                             label_column="label")
    assert len(reference) == len(from_shards) == len(from_hf) == 9
    for i in range(9):
        assert torch.equal(from_shards[i][0], reference[i]) and torch.equal(from_hf[i][0], reference[i])
        assert from_shards[i][1] == from_hf[i][1] == (0 if i < 6 else 1)


# ---- bad input: one paragraph each, before training where the data allows --------------------------------


def _digit_samples(n: int, **extra):
    from torchvision.datasets import MNIST

    digits = MNIST(str(MNIST_ROOT), train=True, download=False).data[:n]
    return [{"__key__": f"{i:06d}", "png": _png(d.numpy()), **extra} for i, d in enumerate(digits)]


def _wds(root: Path, shards: str = "d-{000000..000001}.tar", **options):
    from vaegan_plugins.shards import webdataset

    return webdataset(str(root), "train", False, None, SHAPE, (0.0, 1.0), shards=shards, **options)


@needs_wds
def test_a_pattern_that_matches_nothing_or_misses_shards_is_one_paragraph(tmp_path, caplog):
    with pytest.raises(DataError, match=r"No shard of data.options.shards = 'x-\{0..3\}.tar' exists: its 4 names"):
        _wds(tmp_path, "x-{0..3}.tar")
    _write_shards(tmp_path, _digit_samples(8), per_shard=4)
    with pytest.raises(DataError, match="1 of the 3 shards .* do not exist .*d-000002.tar.*skip_unreadable"):
        _wds(tmp_path, "d-{000000..000002}.tar")
    with caplog.at_level(logging.WARNING):
        assert len(_wds(tmp_path, "d-{000000..000002}.tar", skip_unreadable=True)) == 8
    assert "training on the 2 others" in caplog.text
    assert len(_wds(tmp_path, str(tmp_path / "d-{000000..000001}.tar"))) == 8  # an absolute pattern


@needs_wds
def test_an_empty_a_truncated_or_a_compressed_shard_is_refused_before_training(tmp_path, caplog):
    _write_shards(tmp_path, _digit_samples(4), per_shard=4)
    with tarfile.open(tmp_path / "d-000001.tar", "w"):
        pass
    with pytest.raises(DataError, match="d-000001.tar' holds no samples .*skip_unreadable: true"):
        _wds(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert len(_wds(tmp_path, skip_unreadable=True)) == 4
    assert "holds no samples" in caplog.text
    whole = (tmp_path / "d-000000.tar").read_bytes()
    (tmp_path / "d-000001.tar").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match="d-000001.tar' cannot be read as an uncompressed tar file .*truncated"):
        _wds(tmp_path)
    with tarfile.open(tmp_path / "d-000001.tar", "w:gz") as tar:
        tar.add(tmp_path / "d-000000.tar", arcname="000000.png")
    with pytest.raises(DataError, match="cannot be read as an uncompressed tar file"):
        _wds(tmp_path)


@needs_wds
def test_a_sample_without_its_image_or_label_member_is_named(tmp_path):
    samples = _digit_samples(4, cls=b"3")
    samples[2] = {"__key__": "000002", "txt": b"no image here", "cls": b"1"}
    _write_shards(tmp_path, samples, per_shard=4)
    with pytest.raises(DataError, match="Sample '000002' of shard .*d-000000.tar' has no image member .*cls, txt"):
        _wds(tmp_path, "d-000000.tar")
    with pytest.raises(DataError, match="has no 'jpg' member .*image_key"):
        _wds(tmp_path, "d-000000.tar", image_key="jpg")
    assert len(_wds(tmp_path, "d-000000.tar", skip_unreadable=True)) == 3
    with pytest.raises(DataError, match="has no 'id' member"):
        _wds(tmp_path, "d-000000.tar", label_key="id", skip_unreadable=False)


@needs_wds
def test_a_corrupt_image_inside_a_shard_stops_or_is_skipped_and_counted(tmp_path):
    samples = _digit_samples(8)
    samples[5]["png"] = samples[5]["png"][:40]  # truncated: the header is there, the pixels are not
    _write_shards(tmp_path, samples, per_shard=4)
    with pytest.raises(DataError, match="Image '000005.png' in shard '.*d-000001.tar' cannot be read .*skip_unreadable"):
        _wds(tmp_path)[5]
    ds = _wds(tmp_path, skip_unreadable=True)
    assert torch.equal(ds[5], ds[6]) and ds.unreadable.value == 1  # the next readable image stands in
    ds.bind(rank=0, world=1, batch_size=4, workers=0, seed=0)
    assert sum(b.shape[0] for b in DataLoader(ds, batch_size=4)) == 8 and ds.unreadable.value == 2


@needs_wds
def test_fewer_shards_than_readers_is_refused_when_the_loader_is_built(tmp_path):
    _write_shards(tmp_path, _digit_samples(8), per_shard=4)
    with pytest.raises(DataError, match="names 2 shards \\(with images\\), but 2 processes x 2 data workers make 4 readers"):
        _wds(tmp_path).bind(rank=0, world=2, batch_size=2, workers=2, seed=0)


@needs_hf
def test_a_missing_column_split_or_length_is_one_paragraph(data):
    from vaegan_plugins.hf_datasets import hf_datasets

    def build(**options):
        return hf_datasets(str(data), options.pop("split", "train"), False, None, SHAPE, (0.0, 1.0), **options)

    with pytest.raises(DataError, match="has no column 'img' \\(its columns: image, label, id\\).*image_column"):
        build(path="arrow", image_column="img")
    with pytest.raises(DataError, match="has no column 'class' .*label_column"):
        build(path="files", streaming=True, num_images=N, label_column="class")
    with pytest.raises(DataError, match="Column 'label' .* holds .*int64.*, not images"):
        build(path="arrow", image_column="label")
    with pytest.raises(DataError, match="does not say how many images it holds.*num_images"):
        build(path="files", streaming=True)
    with pytest.raises(DataError, match="No dataset at '.*nowhere' \\('nowhere' is read as a Hugging Face Hub id "
                                        "only with data.download: true\\)"):
        build(path="nowhere")


@needs_hf
def test_an_unreadable_image_in_a_stream_is_replaced_by_the_next_row(tmp_path):
    import datasets
    from torchvision.datasets import MNIST

    digits = MNIST(str(MNIST_ROOT), train=True, download=False).data[:8]
    cells = [{"bytes": _png(d.numpy()), "path": None} for d in digits]
    cells[3] = {"bytes": b"not an image", "path": None}
    features = datasets.Features({"image": datasets.Image(), "id": datasets.Value("int64")})
    datasets.Dataset.from_dict({"image": cells, "id": list(range(8))}, features=features).save_to_disk(
        str(tmp_path / "ds"))
    from vaegan_plugins.hf_datasets import hf_datasets

    def stream(**options):  # not bound to a training loader: read in index order, so row 3 is the bad one
        return hf_datasets(str(tmp_path / "ds"), "train", False, None, SHAPE, (0.0, 1.0), streaming=True, **options)

    with pytest.raises(DataError, match="cannot be read .*skip_unreadable: true"):
        list(stream())
    ds = stream(skip_unreadable=True)
    images = list(ds)
    assert len(images) == 8 and torch.equal(images[3], images[4]) and ds.unreadable.value == 1


# ---- training by plugin name: the MNIST and RGB recipes, 1 and 2 processes ------------------------------


def _data_args(name: str, root: Path, workers: int = 2):
    options = {"webdataset": f"{{shards: '{SHARDS}'}}", "hf_datasets": "{path: arrow, streaming: true}",
               "hf_map": "{path: arrow}"}[name]
    return ["--data-dir", str(root), f"data.name={'hf_datasets' if name == 'hf_map' else name}",
            f"data.options={options}", f"data.num_workers={workers}"]


PLUGINS = [pytest.param("webdataset", marks=needs_wds), pytest.param("hf_datasets", marks=needs_hf),
           pytest.param("hf_map", marks=needs_hf)]


@pytest.mark.slow
@pytest.mark.parametrize("name", PLUGINS)
@pytest.mark.parametrize("config", ["vaegan_mnist.yaml", "rgb_folder_32.yaml"])
def test_the_recipes_train_from_each_plugin_by_name(tmp_path, data, name, config):
    """The RGB recipe reads the gray digits as RGB (image_folder's conversion, reused)."""
    import vaegan
    from vaegan.cli import main

    out = tmp_path / "run"
    args = ["train", str(Path(__file__).parents[1] / "recipes" / "configs" / config), "--output-dir", str(out),
            "--max-steps", "3", "--batch-size", "8", *_data_args(name, data, workers=0), "train.num_samples=4",
            "train.log_every=1", "sampler=null", "train.checkpoint_every=0", "train.plot_loss_curves=false"]
    if config == "rgb_folder_32.yaml":  # a narrow model: two cores
        args += ["model.options={latent_dim: 8, channels: [8, 16], norm_groups: 4, res_blocks: 0}",
                 "discriminator.options={n_layers: 1, base_width: 8, norm: group}"]
    else:
        args += ["model.options={channels: [8, 16], norm_groups: 4, latent_dim: 4}",
                 "discriminator.options={channels: [8, 16]}"]
    assert main(args) == 0
    cfg = vaegan.load_config(out / "config.yaml")
    assert cfg.data.name == ("hf_datasets" if name == "hf_map" else name)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["images_per_sec"] > 0 for r in rows)
    channels = 3 if config == "rgb_folder_32.yaml" else 1
    assert vaegan.VAE.from_pretrained(out / "final").sample(2).shape[1] == channels


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in PLUGINS if n.values[0] != "hf_map"])
def test_one_process_resume_mid_epoch_with_workers_is_exact(tmp_path, data, name):
    common = [f"data.root={data}", *_data_args(name, data)[2:], "train.epochs=3"]
    assert_resume_is_exact(tmp_path, common, stop_at=5)  # epoch 1, batch 1 of 4: worker 1 gives the next batch


def _two_process_chain(root: Path, out: Path, name: str):
    """Uninterrupted, and stopped at step 5 (epoch 1, batch 1 of 4) then resumed, as 2 gloo processes with 2
    workers each."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**ENV, "ACCELERATE_USE_CPU": "true"}
    args = [*TINY, "train.batch_size=8", "train.epochs=3", "train.progress_seconds=0", "train.cpu_threads=1",
            *_data_args(name, root)]
    runs = {"reference": finish(start([*torchrun, *recipe(out / "reference", *args)[1:]], env=env))}
    runs["stopped"] = finish(start([*torchrun, *recipe(out / "resumed", *args, "train.max_steps=5")[1:]], env=env))
    runs["resumed"] = finish(start([*torchrun, *recipe(out / "resumed", *args, "--resume", "latest")[1:]], env=env))
    return runs


@pytest.mark.slow
@pytest.mark.skipif(not (HAS_HF and HAS_WDS), reason="needs the datasets and webdataset packages")
def test_two_processes_interrupted_and_resumed_end_as_an_uninterrupted_run(tmp_path, data):
    """torchrun --nproc_per_node 2 (gloo), 2 data workers per rank, 4 steps an epoch: a run stopped at step 5
    and resumed with --resume latest ends with the weights of a run that was never stopped."""
    chains = side_by_side({name: lambda name=name: _two_process_chain(data, tmp_path / name, name)
                           for name in ("webdataset", "hf_datasets")})
    for name, chain in chains.items():
        assert "error" not in chain, chain
        for run in ("reference", "stopped", "resumed"):
            assert chain[run]["rc"] == 0, f"{name} {run}: {chain[run]['stderr'][-3000:]}"
        assert "Resumed from" in chain["resumed"]["stderr"] and "(epoch 1, batch 1)" in chain["resumed"]["stderr"]
        assert_same_weights(tmp_path / name / "reference", tmp_path / name / "resumed", 12)
        assert os.path.isdir(tmp_path / name / "resumed" / "final")
