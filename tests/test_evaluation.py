"""The evaluation pipeline end to end, and identical results under a real 2-process run."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MNIST_ROOT, tiny_generator

import vaegan
from vaegan import VAE, ModelConfig
from vaegan.cli import main as cli
from vaegan.config import DataConfig, EvalConfig
from vaegan.errors import DataError, PluginError
from vaegan.evaluation import DigitClassifier, evaluate, load_or_train_classifier, prepare_evaluation

DATA = DataConfig(root=str(MNIST_ROOT), split="test", download=False)
TINY_MODEL = ModelConfig(options={"channels": (8, 16), "norm_groups": 4, "latent_dim": 4})
SMALL = EvalConfig(num_samples=64, nll_images=8, nll_samples=4, batch_size=32)
SCALARS = ("mse", "psnr", "ssim", "sharpness_ratio", "high_frequency_ratio", "nll_nats", "nll_bits_per_dim",
           "neg_elbo_nats", "kl_nats", "recon_nats", "fd_classifier", "class_entropy", "precision", "recall")


def test_classifier_is_cached_by_dataset_key(tmp_path):
    a = load_or_train_classifier(DATA, TINY_MODEL, tmp_path, epochs=1)
    files = list(tmp_path.glob("classifier-*.safetensors"))
    assert len(files) == 1 and "-mnist-train-1x28x28-n256-" in files[0].name  # never a bare file name
    mtime = files[0].stat().st_mtime_ns
    b = load_or_train_classifier(DATA, TINY_MODEL, tmp_path, epochs=1)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not retrained
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    other = DataConfig(**{**DATA.__dict__, "options": {"classes": [0, 1, 2]}})
    load_or_train_classifier(other, TINY_MODEL, tmp_path, epochs=1)
    assert len(list(tmp_path.glob("classifier-*.safetensors"))) == 2  # other data, other key


def test_the_feature_classifier_learns_from_the_whole_train_split_whatever_the_limit(tmp_path):
    """`vaegan eval --limit 500` once trained the classifier on 500 images (FD 16.8 for blobs): never again."""
    limited = prepare_evaluation(dataclasses.replace(DATA, limit=64), TINY_MODEL, dataclasses.replace(SMALL, limit=20),
                                 cache_dir=tmp_path)
    whole = prepare_evaluation(DATA, TINY_MODEL, SMALL, cache_dir=tmp_path)
    assert len(limited.dataset) == 20 and limited.classifier.trained_on == whole.classifier.trained_on == 256
    assert len(list(tmp_path.glob("classifier-*-n256-*.safetensors"))) == 1  # one classifier for both
    assert all(torch.equal(p, q) for p, q in zip(limited.classifier.state_dict().values(),
                                                 whole.classifier.state_dict().values()))
    r = evaluate(tiny_generator(), DATA, dataclasses.replace(SMALL, limit=20), resources=limited, cache_dir=tmp_path)
    protocol = r["protocol"]
    assert protocol["images"] == 20 and protocol["limit"] == 20 and protocol["num_samples"] == 64
    assert "all 256 images of the mnist train split (never limited)" in protocol["fd_features"]


def test_identical_images_give_perfect_scores(tmp_path):
    """A 'model' that reconstructs perfectly: PSNR inf, SSIM 1; real vs real features: FD ~ 0."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    from vaegan.classifier import Features
    from vaegan.data import build_dataset, first_batch

    x = first_batch(build_dataset(DATA, TINY_MODEL), 128)
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    assert peak_signal_noise_ratio(x, x, data_range=1.0) == float("inf")
    assert float(structural_similarity_index_measure(x, x, data_range=1.0)) == pytest.approx(1.0)
    fid = FrechetInceptionDistance(feature=Features(DigitClassifier().eval()))
    fid.update(x, real=True)
    fid.update(x, real=False)
    assert abs(float(fid.compute())) < 1e-2


def test_evaluate_writes_every_metric(tmp_path):
    torch.manual_seed(0)
    out = tmp_path / "eval.json"
    model = tiny_generator()
    r = evaluate(model, DATA, SMALL, cache_dir=tmp_path, output=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(r))
    for key in SCALARS:
        assert isinstance(r[key], float) and r[key] == r[key], key  # present and not NaN
    assert r["protocol"]["num_samples"] == 64 and r["protocol"]["likelihood"].startswith("bernoulli")
    assert model.training, "evaluate() must give the model back in the mode it found it"
    again = evaluate(model, DATA, SMALL, cache_dir=tmp_path)
    assert {k: again[k] for k in SCALARS} == {k: r[k] for k in SCALARS}  # seeded: the same numbers twice


@pytest.mark.slow
def test_evaluation_is_identical_on_two_processes(tmp_path):
    """`vaegan eval` under torchrun: each rank takes every second image, latent and noise draw, and the
    states are reduced, so every metric equals a one-process run (up to float summation order)."""
    torch.manual_seed(0)
    model_dir = tiny_generator().save_pretrained(tmp_path / "model")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "VAEGAN_CACHE": str(tmp_path)}
    results = {}
    for n in (1, 2):  # the first run trains and caches the classifier, the second loads it
        out = tmp_path / f"eval{n}.json"
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
                               "-m", "vaegan.cli", "eval", "--model", str(model_dir), "--data-dir", str(MNIST_ROOT),
                               "--num-samples", "64", "--nll-images", "16", "--nll-samples", "4", "--batch-size", "16",
                               "--lpips", "off", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[n] = json.loads(out.read_text())
    assert results[1]["protocol"]["processes"] == 1 and results[2]["protocol"]["processes"] == 2
    for key in SCALARS:  # latents and importance noise are drawn once and sharded like the images
        assert results[2][key] == pytest.approx(results[1][key], rel=1e-4, abs=1e-6), key
    assert results[2]["class_histogram"] == results[1]["class_histogram"]


def test_lpips_distance_of_identical_images_is_zero_and_grows_with_noise():
    from vaegan_plugins.perceptual import LPIPSLoss

    lpips = LPIPSLoss(backbone="random")  # the real network and calibration, offline
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(lpips.distance(x, x), torch.zeros(4), atol=1e-6)
    small, large = lpips.distance((x + 0.05).clamp(0, 1), x), lpips.distance(torch.rand_like(x), x)
    assert (small > 0).all() and (large > small).all()


def test_evaluate_reports_lpips_when_a_network_is_given(tmp_path):
    from vaegan_plugins.perceptual import LPIPSLoss

    res = prepare_evaluation(DATA, TINY_MODEL, dataclasses.replace(SMALL, classifier=False, lpips=False))
    assert res.lpips is None and res.lpips_note.startswith("off")
    res.lpips = LPIPSLoss(backbone="random")
    r = evaluate(tiny_generator(), DATA, SMALL, resources=res)
    assert r["lpips"] > 0 and "LPIPS" in r["protocol"]["lpips"]
    assert "fd_classifier" not in r and r["protocol"]["fd_features"] is None  # classifier: false


def test_evaluate_reports_st_lpips_next_to_lpips_never_in_its_place(tmp_path):
    pytest.importorskip("stlpips_pytorch", reason="the stlpips extra is not installed")
    from vaegan_plugins.perceptual import LPIPSLoss

    res = prepare_evaluation(DATA, TINY_MODEL, dataclasses.replace(SMALL, classifier=False, lpips=False))
    assert res.st_lpips is not None and res.st_lpips.net_name == "alex_st"  # auto: the wheel is installed
    res.lpips = LPIPSLoss(backbone="random")
    r = evaluate(tiny_generator(), DATA, SMALL, resources=res)
    assert r["st_lpips"] > 0 and r["lpips"] > 0 and r["st_lpips"] != r["lpips"]
    assert "not comparable with LPIPS" in r["protocol"]["st_lpips"]
    off = prepare_evaluation(DATA, TINY_MODEL, dataclasses.replace(SMALL, classifier=False, lpips=False,
                                                                   st_lpips=False))
    assert off.st_lpips is None and off.st_lpips_note == "off (eval.st_lpips: false)"


def test_lpips_without_local_weights_is_skipped_or_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached ImageNet weights
    monkeypatch.delenv("VAEGAN_LPIPS_BACKBONE", raising=False)
    auto = prepare_evaluation(DATA, TINY_MODEL, dataclasses.replace(SMALL, classifier=False))
    assert auto.lpips is None and "not available locally" in auto.lpips_note  # auto: a note, not an error
    with pytest.raises(PluginError, match="alexnet"):  # asked for: the plugin's error, naming the file
        prepare_evaluation(DATA, TINY_MODEL, dataclasses.replace(SMALL, classifier=False, lpips=True))


def test_classifier_metrics_follow_the_labels(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        Image.fromarray((np.random.default_rng(i).random((28, 28)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    unlabelled = DataConfig(name="image_folder", root=str(folder), download=False)
    res = prepare_evaluation(unlabelled, TINY_MODEL, dataclasses.replace(SMALL, lpips=False))
    assert res.classifier is None  # auto: no labels, no classifier metrics
    r = evaluate(tiny_generator(), unlabelled, SMALL, resources=res)
    assert "fd_classifier" not in r and r["psnr"] > 0 and r["protocol"]["dataset"] == "image_folder"
    with pytest.raises(DataError, match="no class labels"):
        prepare_evaluation(unlabelled, TINY_MODEL, dataclasses.replace(SMALL, classifier=True, lpips=False))


def test_vaegan_eval_command_prints_and_writes_every_metric(saved_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = cli(["eval", "--model", str(saved_run), "--data-dir", str(MNIST_ROOT), "--num-samples", "64",
                "--nll-images", "8", "--nll-samples", "4", "--lpips", "off", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    results = json.loads(out.read_text())
    for key in SCALARS:
        assert f"{key} " in printed and isinstance(results[key], float), key
    assert results["protocol"]["dataset"] == "mnist" and results["protocol"]["num_samples"] == 64
    assert results["protocol"]["split"] == "test" and results["protocol"]["images"] == 128


@pytest.mark.parametrize("argv, message", [
    (["--out", "eval.txt"], "must be a .json file"),
    (["--num-samples", "0"], "positive integer"),
    (["--data-dir", "{missing}"], "MNIST"),
])
def test_vaegan_eval_refuses_bad_input_in_one_paragraph(saved_run, tmp_path, capsys, argv, message):
    argv = [a.replace("{missing}", str(tmp_path / "nowhere")) for a in argv]
    try:
        code = cli(["eval", "--model", str(saved_run), "--data-dir", str(MNIST_ROOT), *argv])
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_training_evaluates_periodically_and_logs_it(tiny):
    cfg = tiny("train.max_steps=8", "eval.every=4", "eval.num_samples=64", "eval.nll_images=8", "eval.nll_samples=4",
               "eval.lpips=false", "eval.limit=64")
    trainer = vaegan.build_trainer(cfg)
    final = trainer.fit()
    out = Path(cfg.train.output_dir)
    rows = [json.loads(line) for line in (out / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 8]  # every 4 steps; the end coincides with step 8
    final_eval = json.loads((final / "eval.json").read_text())
    assert final_eval == {k: v for k, v in rows[-1].items() if k != "step"}
    assert rows[0]["protocol"]["images"] == 64 and rows[0]["fd_classifier"] > 0
    # The EMA generator is the one evaluated: the numbers are those of the saved final/ model.
    again = evaluate(VAE.from_pretrained(final), cfg.data, cfg.eval)
    assert again["psnr"] == pytest.approx(final_eval["psnr"], rel=1e-5)


def test_evaluation_settings_are_checked_before_training(tiny, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(20):
        Image.fromarray((np.random.default_rng(i).random((28, 28)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    data = ["data.name=image_folder", f"data.root={folder}", "data.limit=null", "train.batch_size=4"]
    with pytest.raises(DataError, match="no class labels"):  # FD needs a labelled dataset's classifier
        vaegan.build_trainer(tiny(*data, "eval.every=4", "eval.classifier=true"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_inception_fid_is_refused_clearly_when_it_cannot_run_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # no cached Inception weights
    config = dataclasses.replace(SMALL, classifier=False, lpips=False, inception=True)
    with pytest.raises(PluginError, match="torch-fidelity|weights-inception-2015-12-05") as info:
        prepare_evaluation(DATA, TINY_MODEL, config)
    assert "eval.inception off" in str(info.value)  # says how to go on without it


def test_undefined_metrics_are_null_with_a_reason_and_the_file_is_strict_json(tmp_path, caplog):
    """All-black images: the sharpness and high-frequency ratios divide by the real images' zero energy."""
    from PIL import Image

    folder = tmp_path / "black"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(folder / f"{i}.png")
    data = DataConfig(name="image_folder", root=str(folder), download=False)
    res = prepare_evaluation(data, TINY_MODEL, dataclasses.replace(SMALL, lpips=False))
    out = tmp_path / "eval.json"
    r = evaluate(tiny_generator(), data, SMALL, resources=res, output=out)
    assert r["sharpness_ratio"] is None and "no Laplacian energy" in r["undefined"]["sharpness_ratio"]
    assert r["high_frequency_ratio"] is None and "constant or blank images" in r["undefined"]["high_frequency_ratio"]

    def refuse(constant):
        raise AssertionError(f"{constant} in a JSON file")

    written = json.loads(out.read_text(), parse_constant=refuse)  # NaN / Infinity would be refused here
    assert written["sharpness_ratio"] is None and written["undefined"] == r["undefined"]
    assert "sharpness_ratio is undefined (null in the results)" in caplog.text
    assert all(v is None or np.isfinite(v) for v in written.values() if isinstance(v, (float, type(None))))


def test_a_nan_metric_in_the_training_log_is_null(tmp_path):
    from vaegan.faults import SoftWrites

    log = tmp_path / "metrics.jsonl"
    SoftWrites().append_line("metrics", log, {"step": 1, "g/total": float("nan"), "d/total": float("inf"), "lr": 1e-3})
    assert json.loads(log.read_text(), parse_constant=lambda c: 1 / 0) == {"step": 1, "g/total": None, "d/total": None,
                                                                          "lr": 1e-3}


def test_eval_of_one_image_with_the_classifier_reports_undefined_distances(tmp_path):
    """`eval --limit 1`: a Fréchet distance and precision/recall of one image are undefined, not a traceback."""
    r = evaluate(tiny_generator(), DATA, dataclasses.replace(SMALL, limit=1, num_samples=1), cache_dir=tmp_path)
    for key in ("fd_classifier", "precision", "recall"):
        assert r[key] is None and ("Fréchet" in r["undefined"][key] or "k = 3" in r["undefined"][key]), key
    assert r["psnr"] is not None and r["protocol"]["images"] == 1
