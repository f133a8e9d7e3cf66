"""Experiment tracking through Accelerate: real wandb (offline), real TensorBoard, real failures.

Each run is the real trainer on the committed digits; what the trackers wrote is read back from disk
(the W&B transaction log and media files, TensorBoard event files) and compared with metrics.jsonl
and the PNG grids the trainer wrote at the same steps.
"""

from __future__ import annotations

import json
import logging
import secrets
import struct
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from PIL import Image

import vaegan
from vaegan.plots import group_metrics, read_metrics
from vaegan.tracking import REDACTED, scrub_secrets, tracker_config

RUN = ("train.max_steps=8", "train.log_every=2", "train.sample_every=4", "train.checkpoint_every=4")
PANELS = ("reconstructions", "samples", "interpolations")


@pytest.fixture(autouse=True)
def _fresh_wandb():
    """wandb reads the WANDB_* variables once per process (a singleton): tear it down around each
    test so that the variables a test sets are the ones in force."""
    import wandb

    wandb.teardown()
    yield
    wandb.teardown()


def _metrics(out: Path) -> List[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _wandb_records(run_file: Path) -> List[object]:
    """Every record of a ``run-<id>.wandb`` transaction log.

    wandb 0.31 no longer ships a Python reader (``wandb.sdk.internal.datastore`` is gone; the Go core
    writes the file), so this reads the documented LevelDB-log layout directly: a 7-byte header
    (":W&B", magic, version), then 32 KiB blocks of chunks [crc32 u32, length u16, type u8, data]
    where type 1 is a whole record and 2/3/4 the first/middle/last piece of one. Each record is a
    ``wandb_internal_pb2.Record`` protobuf.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B", f"{run_file} is not a W&B transaction log"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a chunk header never straddles blocks: the tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _wandb_config(records) -> Dict[str, object]:
    config: Dict[str, object] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in updates:
            config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
    return config


def _wandb_history(records) -> Dict[int, Dict[str, object]]:
    """step -> {key: value} merged over every history record of that step."""
    rows: Dict[int, Dict[str, object]] = {}
    for r in records:
        if r.WhichOneof("record_type") != "history":
            continue
        items = {"/".join(i.nested_key) if i.nested_key else i.key: json.loads(i.value_json) for i in r.history.item}
        rows.setdefault(int(items["_step"]), {}).update(items)
    return rows


def _no_secret_under(root: Path, secret: str) -> None:
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert secret.encode() not in path.read_bytes(), f"the API key leaked into {path}"


@pytest.mark.slow
def test_wandb_offline_run_records_config_every_term_and_images(tiny, monkeypatch, caplog):
    secret = secrets.token_hex(20)  # the shape of a W&B key
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.delenv("WANDB_DIR", raising=False)  # the default: under the output directory
    cfg = tiny("train.report_to=wandb", "adversarial.adaptive=true", *RUN, "eval.every=8", "eval.num_samples=32",
               "eval.nll_images=4", "eval.nll_samples=2", "eval.lpips=false", "eval.limit=32")
    with caplog.at_level(logging.WARNING, logger="vaegan"):
        vaegan.build_trainer(cfg).fit()
    assert not [r for r in caplog.records if "tracker" in r.getMessage()], "the tracker must not have failed"
    out = Path(cfg.train.output_dir)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, "the W&B run must live under the output directory"
    records = _wandb_records(next(runs[0].glob("run-*.wandb")))

    config = _wandb_config(records)
    in_run_record = _wandb_config([r for r in records if r.WhichOneof("record_type") == "run"])
    for key, value in tracker_config(cfg, environ={}).items():
        assert config[key] == value, key  # the resolved config, flattened
        assert in_run_record[key] == value, key  # in the run record itself, not only a later config update

    history = _wandb_history(records)
    rows = _metrics(out)
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    for row in rows:  # every scalar of metrics.jsonl, at its step, with its value
        for key, value in row.items():
            if key != "step":
                assert history[row["step"]][key] == pytest.approx(value, rel=1e-6), (row["step"], key)
    assert {"g/bce", "g/kl", "g/adversarial", "g/adaptive_weight", "d/discriminator", "d/logits_real",
            "d/logits_fake", "grad_norm/g", "grad_norm/d", "lr/g", "lr/d", "weight/kl", "images_per_sec"} <= set(rows[0])

    (evaluated,) = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    for key in ("psnr", "ssim", "fd_classifier", "nll_bits_per_dim", "sharpness_ratio", "recall"):
        assert history[8][f"eval/{key}"] == pytest.approx(evaluated[key], rel=1e-6), key  # evaluation reaches W&B

    for step in (4, 8):
        for panel in PANELS:
            (name,) = history[step][f"images/{panel}/filenames"]  # one grid per panel
            logged = _png(runs[0] / "files" / name)
            written = _png(out / "samples" / f"step_{step:08d}_{panel}.png")
            np.testing.assert_array_equal(logged, written)  # the tracker shows the very pixels of the PNG
    _no_secret_under(out, secret)


def test_wandb_dir_from_the_environment_is_respected(tiny, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    (tmp_path / "wandb_home").mkdir()
    cfg = tiny("train.report_to=wandb", "train.max_steps=2")
    vaegan.build_trainer(cfg).fit()
    assert list((tmp_path / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (Path(cfg.train.output_dir) / "wandb").exists()


def test_tensorboard_event_files_hold_every_scalar_and_the_images(tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny("train.report_to=tensorboard", *RUN)
    vaegan.build_trainer(cfg).fit()
    out = Path(cfg.train.output_dir)
    events = EventAccumulator(str(out / cfg.train.project), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    rows = _metrics(out)
    for row in rows:
        for key, value in row.items():
            if key == "step":
                continue
            logged = {e.step: e.value for e in events.Scalars(key)}
            assert logged[row["step"]] == pytest.approx(value, rel=1e-5, abs=1e-7), (row["step"], key)
    for panel in PANELS:
        logged = {e.step: e for e in events.Images(f"images/{panel}")}
        assert sorted(logged) == [4, 8]
        import io

        decoded = np.asarray(Image.open(io.BytesIO(logged[4].encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(decoded, _png(out / "samples" / f"step_00000004_{panel}.png"))
    hparams = next((out / cfg.train.project).glob("*/hparams.yml")).read_text()
    assert "train.batch_size: 16" in hparams and "model.options.latent_dim: 4" in hparams


def _finished_with_checkpoints(cfg) -> None:
    out = Path(cfg.train.output_dir)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004", "step_00000008"]
    assert vaegan.VAE.from_pretrained(out / "final").sample(2).shape == (2, 1, 28, 28)
    assert [r["step"] for r in _metrics(out)] == [2, 4, 6, 8]
    assert (out / "samples" / "final_samples.png").is_file()


def _tracker_warnings(caplog) -> List[str]:
    return [r.getMessage() for r in caplog.records if "experiment tracker" in r.getMessage()]


@pytest.mark.parametrize("report_to, breakage", [
    ("wandb", "invalid_mode"),  # WANDB_MODE set to a value wandb refuses
    ("wandb", "no_api_key"),  # online mode with no key anywhere (a fresh HOME)
    ("tensorboard", "unwritable_log_dir"),  # a file where the log folder must go
])
def test_a_tracker_that_cannot_start_costs_nothing(tiny, tmp_path, monkeypatch, caplog, report_to, breakage):
    cfg = tiny(f"train.report_to={report_to}", *RUN)
    out = Path(cfg.train.output_dir)
    if breakage == "invalid_mode":
        monkeypatch.setenv("WANDB_MODE", "not-a-mode")
    elif breakage == "no_api_key":
        monkeypatch.setenv("WANDB_MODE", "online")
        monkeypatch.delenv("WANDB_API_KEY", raising=False)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc, no ~/.config/wandb
        monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / "wandb"))
    else:
        out.mkdir(parents=True)
        (out / cfg.train.project).write_text("not a folder")
    with caplog.at_level(logging.WARNING, logger="vaegan"):
        trainer = vaegan.build_trainer(cfg)
        trainer.fit()
    _finished_with_checkpoints(cfg)
    warnings = _tracker_warnings(caplog)
    assert len(warnings) == 1 and f"'{report_to}'" in warnings[0] and "starting" in warnings[0], warnings
    assert trainer.tracking.active == []


class _Recorder(GeneralTracker):
    """A working custom tracker (Accelerate accepts GeneralTracker instances in ``log_with``)."""

    name = "recorder"
    requires_logging_directory = False

    def __init__(self, fail_from_call: int = 0, message: str = "No space left on device") -> None:
        super().__init__()
        self.fail_from_call = fail_from_call  # 0: never fails
        self.message = message
        self.calls, self.scalars, self.images, self.config, self.finished = 0, {}, {}, None, 0

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values: dict) -> None:
        self.config = dict(values)

    def _call(self) -> None:
        self.calls += 1
        if self.fail_from_call and self.calls >= self.fail_from_call:
            raise OSError(28, self.message)

    def log(self, values: dict, step=None, **kwargs) -> None:
        self._call()
        self.scalars[step] = dict(values)

    def log_images(self, values: dict, step=None, **kwargs) -> None:
        self._call()
        self.images[step] = {k: np.asarray(v) for k, v in values.items()}

    def finish(self) -> None:
        self.finished += 1


def test_a_tracker_failing_mid_run_is_switched_off_and_the_others_go_on(tiny, caplog, monkeypatch):
    """A full disk at the tracker's second call: one warning, no more calls, training and checkpoints
    unaffected; a second tracker of the same run keeps receiving everything. An API key that the
    failing library puts in its error message does not reach the log."""
    secret = secrets.token_hex(20)
    monkeypatch.setenv("WANDB_API_KEY", secret)
    cfg = tiny(*RUN)
    failing, healthy = _Recorder(fail_from_call=2, message=f"No space left on device (key {secret})"), _Recorder()
    failing.name = "failing"
    acc = Accelerator(log_with=[failing, healthy], project_dir=cfg.train.output_dir)
    with caplog.at_level(logging.WARNING, logger="vaegan"):
        trainer = vaegan.build_trainer(cfg, accelerator=acc)
        trainer.fit()
    _finished_with_checkpoints(cfg)
    warnings = _tracker_warnings(caplog)
    assert len(warnings) == 1 and "'failing'" in warnings[0] and "No space left" in warnings[0]
    assert secret not in warnings[0] and REDACTED in warnings[0]
    assert failing.calls == 2 and list(failing.scalars) == [2] and failing.finished == 1
    rows = _metrics(Path(cfg.train.output_dir))
    assert healthy.scalars == {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in rows}
    assert sorted(healthy.images) == [4, 8] and set(healthy.images[4]) == {f"images/{p}" for p in PANELS}
    assert healthy.images[4]["images/samples"].dtype == np.uint8 and healthy.images[4]["images/samples"].ndim == 4
    assert healthy.config == tracker_config(cfg) and healthy.finished == 1
    assert trainer.tracking.active == []  # closed at the end


def test_secrets_are_redacted_from_tracker_config():
    key = secrets.token_hex(20)
    flat = {"data.root": f"/data/{key}/mnist", "losses.0.options.api_token": "x", "train.seed": 3,
            "model.channels": "[32, 64]", "adversarial.options.password": None}
    clean = scrub_secrets(flat, environ={"WANDB_API_KEY": key, "OMP_NUM_THREADS": "1"})
    assert clean == {"data.root": REDACTED, "losses.0.options.api_token": REDACTED, "train.seed": 3,
                     "model.channels": "[32, 64]", "adversarial.options.password": REDACTED}
    # A short environment value (a flag, a count) must not redact innocent values.
    assert scrub_secrets({"train.project": "vaegan1"}, environ={"SOME_TOKEN": "1"}) == {"train.project": "vaegan1"}


def test_loss_curves_cover_every_logged_term(tiny):
    cfg = tiny("train.max_steps=6", "adversarial.adaptive=true", "train.plot_loss_curves=true")
    vaegan.build_trainer(cfg).fit()
    out = Path(cfg.train.output_dir)
    with Image.open(out / "loss_curves.png") as img:
        assert img.format == "PNG" and img.width >= 800 and img.height >= 1000
    series = read_metrics(out / "metrics.jsonl")
    logged = {k for r in _metrics(out) for k in r} - {"step", "epoch"}
    assert set(series) == logged
    groups = group_metrics(series)
    assert sorted(k for g in groups.values() for k in g) == sorted(logged)  # each term in one subplot
    assert {"g", "d", "d_logits", "weight", "grad_norm", "lr"} <= set(groups)
    assert "g/adaptive_weight" in groups["weight"]


def test_identical_series_stay_visible_and_say_so(tiny):
    """With the same schedule for both players, lr/d would hide under lr/g: it is dashed and labelled."""
    from vaegan.plots import loss_curves_figure

    cfg = tiny("train.max_steps=4")
    vaegan.build_trainer(cfg).fit()
    fig = loss_curves_figure(Path(cfg.train.output_dir) / "metrics.jsonl")
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    twins = [label for label in lines if label.startswith("lr/") and "(= " in label]
    assert twins in (["lr/d (= lr/g)"], ["lr/g (= lr/d)"]), list(lines)
    original = twins[0].split("(= ")[1].rstrip(")")
    assert lines[original].get_linestyle() == "-" and lines[twins[0]].get_linestyle() == "--"
    assert "g/total" in lines and not any("(= g/total)" in label for label in lines)  # different series: plain
