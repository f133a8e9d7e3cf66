"""Typed config: defaults, YAML round trips, key/type validation and dotted overrides."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from vaegan.config import (
    AdversarialConfig,
    DataConfig,
    DiscriminatorConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    TermConfig,
    TrainConfig,
    apply_overrides,
    from_dict,
    load_config,
    to_dict,
)
from vaegan.errors import ConfigError, VaeganError
from vaegan.schedules import Schedule


def _write_yaml(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- defaults and round trips ------------------------------------------------------------------


def test_defaults_build_a_vaegan():
    cfg = ExperimentConfig()
    assert cfg.model == ModelConfig()
    assert cfg.model.image_shape == (1, 28, 28)
    assert [t.key for t in cfg.losses] == ["bce", "kl"]
    assert cfg.losses[1].weight == Schedule(value=1.0, warmup=1000)
    assert cfg.discriminator == DiscriminatorConfig()
    assert cfg.adversarial == AdversarialConfig()
    assert cfg.train.batch_size == 64
    # An empty mapping is the defaults too.
    assert ExperimentConfig.from_dict({}) == cfg


def test_config_errors_are_value_errors():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"nope": 1})
    assert isinstance(info.value, VaeganError) and isinstance(info.value, ValueError)


def test_to_dict_is_plain_yaml_safe_data():
    data = apply_overrides(ExperimentConfig(), ["model.options={channels: [32, 64]}"]).to_dict()
    assert isinstance(data["model"]["image_size"], list) and isinstance(data["model"]["options"], dict)
    assert isinstance(data["model"]["options"]["channels"], list)
    assert isinstance(data["losses"], list) and isinstance(data["losses"][0]["options"], dict)
    # safe_dump refuses tuples / mappingproxies / dataclasses, so this proves plain data.
    text = yaml.safe_dump(data)
    assert yaml.safe_load(text) == data


def test_round_trip_through_dicts_of_a_non_default_config():
    cfg = ExperimentConfig.from_dict(
        {
            "model": {"name": "mlp", "image_channels": 3, "image_size": [32, 24], "options": {"hidden": [64, 32]}},
            "losses": [
                {"name": "mse", "weight": 0.5},
                {"name": "kl", "weight": {"value": 2.0, "cycle": 100, "ramp": 0.25}, "options": {"free_bits": 0.1}},
                {"name": "kl", "label": "kl2", "weight": {"value": 0.1, "start_fraction": 0.5}},
            ],
            "discriminator": {"name": "simple", "options": {"channels": [8, 16]}},
            "train": {"mixed_precision": "bf16", "max_steps": 10, "ema_decay": None},
        }
    )
    again = ExperimentConfig.from_dict(cfg.to_dict())
    assert again == cfg
    assert again.model.image_size == (32, 24)
    assert again.losses[1].options["free_bits"] == 0.1
    assert again.train.ema_decay is None


def test_yaml_file_round_trip_with_load_config(tmp_path):
    cfg = apply_overrides(ExperimentConfig(), ["model.options.latent_dim=8", "train.batch_size=32"])
    path = _write_yaml(tmp_path / "exp.yaml", cfg.to_dict())
    assert load_config(path) == cfg
    # Overrides apply on top of the file.
    loaded = load_config(path, ["train.batch_size=7", "model.image_size=[32, 32]"])
    assert loaded.train.batch_size == 7
    assert loaded.model.image_size == (32, 32)
    assert loaded.model.options["latent_dim"] == 8


def test_load_config_partial_file_and_no_file(tmp_path):
    path = _write_yaml(tmp_path / "partial.yaml", {"train": {"epochs": 3}})
    cfg = load_config(str(path))
    assert cfg.train.epochs == 3
    assert cfg.train.batch_size == TrainConfig().batch_size
    assert load_config(None, ["train.epochs=4"]).train.epochs == 4
    # An empty file is the defaults.
    (tmp_path / "empty.yaml").write_text("")
    assert load_config(tmp_path / "empty.yaml") == ExperimentConfig()


def test_load_config_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = _write_yaml(tmp_path / "list.yaml", [1, 2])
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


# ---- unknown keys and wrong types --------------------------------------------------------------


def test_unknown_top_level_key_lists_allowed_keys():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"modle": {}})
    msg = str(info.value)
    assert "modle" in msg
    for name in ("model", "data", "losses", "discriminator", "adversarial", "optim_g", "optim_d", "train"):
        assert name in msg


def test_unknown_nested_key_names_key_and_section():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"train": {"batch_sise": 32}})
    msg = str(info.value)
    assert "batch_sise" in msg and "in 'train'" in msg
    assert "batch_size" in msg and "epochs" in msg  # the allowed keys


def test_unknown_key_inside_a_loss_term_and_schedule():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"losses": [{"name": "mse", "wieght": 1.0}]})
    assert "wieght" in str(info.value) and "losses[0]" in str(info.value) and "weight" in str(info.value)
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"losses": [{"name": "mse", "weight": {"value": 1.0, "warm_up": 5}}]})
    assert "warm_up" in str(info.value) and "losses[0].weight" in str(info.value)


@pytest.mark.parametrize(
    "data, key, what",
    [
        ({"train": {"batch_size": "64"}}, "train.batch_size", "integer"),
        ({"train": {"batch_size": 64.5}}, "train.batch_size", "integer"),
        ({"model": {"image_channels": True}}, "model.image_channels", "integer"),
        ({"model": {"options": [16]}}, "model.options", "mapping"),
        ({"data": {"options": "fast"}}, "data.options", "mapping"),
        ({"data": {"download": "yes"}}, "data.download", "true or false"),
        ({"data": {"download": 1}}, "data.download", "true or false"),
        ({"optim_g": {"lr": "fast"}}, "optim_g.lr", "finite number"),
        ({"optim_d": {"lr": True}}, "optim_d.lr", "finite number"),
        ({"optim_g": {"lr": float("nan")}}, "optim_g.lr", "finite number"),
        ({"model": {"image_size": [28]}}, "model.image_size", "list of 2 items"),
        ({"model": {"image_size": [28, 28, 28]}}, "model.image_size", "list of 2 items"),
        ({"model": {"image_size": 28}}, "model.image_size", "must be a list"),
        ({"optim_g": {"betas": [0.5]}}, "optim_g.betas", "list of 2 items"),
        ({"data": {"root": 5}}, "data.root", "string"),
        ({"train": {"max_steps": "10"}}, "train.max_steps", "null"),
        ({"losses": [{"name": "kl", "weight": {"warmup": "soon"}}]}, "losses[0].weight.warmup", "integer"),
        ({"losses": [{"name": "kl", "options": [1, 2]}]}, "losses[0].options", "mapping"),
    ],
)
def test_wrong_types_name_the_dotted_key(data, key, what):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data)
    msg = str(info.value)
    assert f"'{key}'" in msg
    assert what in msg


@pytest.mark.parametrize("data, words", [
    ({"discriminator": {"nmae": "simple"}}, ["nmae", "Allowed keys"]),
    ({"adversarial": {"disc_start": "x"}}, ["'adversarial.disc_start'", "integer"]),
])
def test_errors_inside_optional_sections_name_the_nested_key(data, words):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data)
    for w in words:
        assert w in str(info.value)


def test_errors_inside_optional_sections_are_config_errors():
    with pytest.raises(ConfigError, match="'discriminator'"):
        ExperimentConfig.from_dict({"discriminator": {"nmae": "simple"}})
    with pytest.raises(ConfigError, match="'adversarial.disc_start'"):
        ExperimentConfig.from_dict({"adversarial": {"disc_start": "x"}})


def test_integral_floats_are_accepted_for_ints_and_ints_for_floats():
    cfg = ExperimentConfig.from_dict({"train": {"batch_size": 32.0}, "optim_g": {"lr": 1}})
    assert cfg.train.batch_size == 32 and isinstance(cfg.train.batch_size, int)
    assert cfg.optim_g.lr == 1.0 and isinstance(cfg.optim_g.lr, float)


@pytest.mark.parametrize(
    "data, key, allowed",
    [
        ({"model": {"output_range": "zero_one"}}, "model.output_range", ["'unit'", "'symmetric'"]),
        ({"data": {"split": "val"}}, "data.split", ["'train'", "'test'"]),
        ({"optim_g": {"decay": "linear"}}, "optim_g.decay", ["'constant'", "'cosine'"]),
        ({"train": {"mixed_precision": "fp8"}}, "train.mixed_precision", ["'no'", "'fp16'", "'bf16'", "null"]),
        ({"train": {"report_to": "mlflow"}}, "train.report_to", ["'none'", "'wandb'", "'tensorboard'"]),
    ],
)
def test_literal_values_rejected_with_allowed_ones_listed(data, key, allowed):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict(data)
    msg = str(info.value)
    assert f"'{key}'" in msg
    for a in allowed:
        assert a in msg


def test_literal_values_accepted():
    cfg = ExperimentConfig.from_dict({"train": {"mixed_precision": None, "report_to": "tensorboard"},
                                      "model": {"output_range": "symmetric"}})
    assert cfg.train.mixed_precision is None
    assert cfg.train.report_to == "tensorboard"
    assert cfg.model.output_range == "symmetric"


def test_missing_required_key_and_bad_sections():
    with pytest.raises(ConfigError, match="name"):
        ExperimentConfig.from_dict({"losses": [{"weight": 1.0}]})
    with pytest.raises(ConfigError, match="'losses' must be a list"):
        ExperimentConfig.from_dict({"losses": {"name": "mse"}})
    with pytest.raises(ConfigError, match="'train' must be a mapping"):
        ExperimentConfig.from_dict({"train": 5})
    with pytest.raises(ConfigError, match="must be a mapping"):
        ExperimentConfig.from_dict([("train", {})])


def test_section_validation_errors():
    with pytest.raises(ConfigError, match="image_size"):
        ModelConfig(image_size=(0, 28))
    with pytest.raises(ConfigError, match="image_channels"):
        ModelConfig(image_channels=0)
    with pytest.raises(ConfigError, match="data.limit"):
        DataConfig(limit=0)
    with pytest.raises(ConfigError, match="betas"):
        OptimConfig(betas=(0.5, 1.0))
    with pytest.raises(ConfigError, match="grad_clip"):
        OptimConfig(grad_clip=0.0)
    with pytest.raises(ConfigError, match="lr"):
        OptimConfig(lr=-1.0)
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="checkpoints_total_limit"):
        TrainConfig(checkpoints_total_limit=0)
    with pytest.raises(ConfigError, match="disc_start"):
        AdversarialConfig(disc_start=-1)
    # The same checks run through from_dict.
    with pytest.raises(ConfigError, match="batch_size"):
        ExperimentConfig.from_dict({"train": {"batch_size": 0}})


# ---- overrides -----------------------------------------------------------------------------------


def test_dotted_overrides():
    base = ExperimentConfig()
    cfg = apply_overrides(base, ["train.batch_size=128", "model.options.latent_dim=8", "data.root=/tmp/x",
                                 "train.max_steps=null", "train.mixed_precision=bf16"])
    assert cfg.train.batch_size == 128
    assert cfg.model.options == {"latent_dim": 8}
    assert cfg.data.root == "/tmp/x"
    assert cfg.train.max_steps is None
    assert cfg.train.mixed_precision == "bf16"
    assert base.train.batch_size == 64  # the original is unchanged (frozen)


def test_override_list_index_replaces_a_loss_weight():
    cfg = apply_overrides(ExperimentConfig(), ["losses.1.weight=0.5"])
    assert cfg.losses[1].name == "kl"
    assert cfg.losses[1].weight == Schedule.constant(0.5)
    assert cfg.losses[0].weight == Schedule()
    # Deeper: change one field of the schedule and keep its warm-up.
    cfg = apply_overrides(ExperimentConfig(), ["losses.1.weight.value=0.25"])
    assert cfg.losses[1].weight == Schedule(value=0.25, warmup=1000)
    # A list element directly.
    cfg = apply_overrides(ExperimentConfig(), ["model.options={channels: [32, 64]}", "model.options.channels.0=16"])
    assert cfg.model.options["channels"] == [16, 64]


def test_override_values_are_yaml():
    cfg = apply_overrides(ExperimentConfig(), ["model.image_size=[32, 16]",
                                               "discriminator.options={channels: [8, 16]}",
                                               "losses.0.options={}"])
    assert cfg.model.image_size == (32, 16)
    assert cfg.discriminator.options["channels"] == [8, 16]


def test_override_into_a_null_section_creates_it():
    vae = apply_overrides(ExperimentConfig(), ["discriminator=", "adversarial=null"])
    assert vae.discriminator is None and vae.adversarial is None
    back = apply_overrides(vae, ["discriminator.name=simple", "adversarial.disc_start=5"])
    assert back.discriminator == DiscriminatorConfig()
    assert back.adversarial.disc_start == 5


@pytest.mark.parametrize(
    "override, match",
    [
        ("train.batch_size", "must look like"),
        ("=3", "must look like"),
        ("train.batch_sise=3", "batch_sise"),
        ("train.batch_size=big", "'train.batch_size' must be an integer"),
        ("train=5", "'train' must be a mapping"),
        ("model.output_range=sideways", "'model.output_range'"),
        ("model.options=3", "'model.options'"),
    ],
)
def test_bad_overrides_raise_config_error(override, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(ExperimentConfig(), [override])
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


@pytest.mark.parametrize("override", ["losses.5.weight=1", "losses.x.weight=1", "losses.-1.weight=1",
                                      "model.image_size.2=8"])
def test_bad_list_index_overrides(override):
    with pytest.raises(ConfigError) as info:
        apply_overrides(ExperimentConfig(), [override])
    assert "must be an index below" in str(info.value)
    assert override.split("=")[0] in str(info.value)


@pytest.mark.parametrize("override, check", [
    ("losses.1.weight=0.5", lambda c: c.losses[1].weight == Schedule.constant(0.5)),
    ("model.image_size.0=32", lambda c: c.model.image_size == (32, 28)),
])
def test_load_config_list_index_override_on_defaults(tmp_path, override, check):
    path = _write_yaml(tmp_path / "exp.yaml", {"train": {"epochs": 2}})
    cfg = load_config(path, [override])
    assert check(cfg)


def test_override_with_invalid_yaml_value_raises_config_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        apply_overrides(ExperimentConfig(), ["train.epochs=[1"])


@pytest.mark.parametrize("override", ["train.epochs.x=1", "train.epochs.x.y=1", "data.root.sub=a"])
def test_override_through_a_scalar_raises_config_error(override):
    with pytest.raises(ConfigError):
        apply_overrides(ExperimentConfig(), [override])


def test_override_exponent_float_without_dot():
    # The module docstring's own example; plain YAML 1.1 would read "1e-3" as a string.
    cfg = apply_overrides(ExperimentConfig(), ["optim_g.lr=1e-3", "optim_d.lr=5E-5"])
    assert cfg.optim_g.lr == pytest.approx(1e-3)
    assert cfg.optim_d.lr == pytest.approx(5e-5)
    assert load_config(None, [f"optim_g.lr={1e-05}"]).optim_g.lr == pytest.approx(1e-5)  # what --lr writes


def test_yaml_file_exponent_floats_and_no_string(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("optim_g:\n  lr: 1e-4\ntrain:\n  mixed_precision: no\n")
    cfg = load_config(path)
    assert cfg.optim_g.lr == pytest.approx(1e-4)
    assert cfg.train.mixed_precision == "no"


def test_override_yaml_booleans_and_no():
    cfg = apply_overrides(ExperimentConfig(), ["train.mixed_precision=no", "data.download=false"])
    assert cfg.train.mixed_precision == "no"
    assert cfg.data.download is False


def test_override_exponent_float_with_dot_works():
    # The YAML 1.1 form that does parse as a float today.
    cfg = apply_overrides(ExperimentConfig(), ["optim_g.lr=1.0e-3"])
    assert cfg.optim_g.lr == pytest.approx(1e-3)


# ---- schedules inside the config -----------------------------------------------------------------


def test_schedule_as_number_or_mapping():
    cfg = ExperimentConfig.from_dict({"losses": [
        {"name": "mse", "weight": 0.5},
        {"name": "l1", "weight": 2},
        {"name": "kl", "weight": {"value": 1.0, "warmup": 10, "start": 5}},
    ]})
    assert cfg.losses[0].weight == Schedule.constant(0.5)
    assert cfg.losses[1].weight == Schedule(value=2.0)
    assert isinstance(cfg.losses[1].weight.value, float)
    kl = cfg.losses[2].weight
    assert (kl.value, kl.warmup, kl.start) == (1.0, 10, 5)
    assert kl(10) == pytest.approx(0.5)
    adv = ExperimentConfig.from_dict({"adversarial": {"weight": 0.3}}).adversarial
    assert adv.weight == Schedule(value=0.3)


@pytest.mark.parametrize("weight", [True, "0.5", [1.0]])
def test_schedule_of_wrong_type_rejected(weight):
    with pytest.raises(ConfigError, match=r"losses\[0\]\.weight"):
        ExperimentConfig.from_dict({"losses": [{"name": "mse", "weight": weight}]})


@pytest.mark.parametrize("weight", [-1, -0.5, float("inf"), float("nan"), {"value": -1.0},
                                    {"value": float("inf")}, {"value": float("nan")}])
def test_negative_or_non_finite_weights_rejected(weight):
    with pytest.raises(ConfigError):
        ExperimentConfig.from_dict({"losses": [{"name": "mse", "weight": weight}]})
    with pytest.raises(ConfigError):
        ExperimentConfig.from_dict({"adversarial": {"weight": weight}})


def test_zero_weight_is_allowed():
    cfg = ExperimentConfig.from_dict({"losses": [{"name": "mse", "weight": 0}]})
    assert cfg.losses[0].weight.value == 0.0


# ---- cross-field checks --------------------------------------------------------------------------


def test_discriminator_and_adversarial_go_together():
    with pytest.raises(ConfigError, match="go together"):
        ExperimentConfig.from_dict({"discriminator": None})
    with pytest.raises(ConfigError, match="go together"):
        ExperimentConfig.from_dict({"adversarial": None})
    with pytest.raises(ConfigError, match="go together"):
        apply_overrides(ExperimentConfig(), ["adversarial=null"])
    plain = ExperimentConfig.from_dict({"discriminator": None, "adversarial": None})
    assert plain.discriminator is None and plain.adversarial is None
    assert ExperimentConfig.from_dict(plain.to_dict()) == plain


def test_duplicate_loss_keys_rejected_unless_labelled():
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({"losses": [{"name": "kl"}, {"name": "mse"}, {"name": "kl"}]})
    assert "kl" in str(info.value) and "label" in str(info.value)
    with pytest.raises(ConfigError, match="mse"):
        ExperimentConfig.from_dict({"losses": [{"name": "kl", "label": "mse"}, {"name": "mse"}]})
    ok = ExperimentConfig.from_dict({"losses": [{"name": "kl"}, {"name": "kl", "label": "kl_free",
                                                                  "options": {"free_bits": 0.5}}]})
    assert [t.key for t in ok.losses] == ["kl", "kl_free"]


def test_term_config_key_and_from_dict_helper():
    assert TermConfig("mse").key == "mse"
    assert TermConfig("mse", label="recon").key == "recon"
    model = from_dict(ModelConfig, {"options": {"latent_dim": 3}}, "model")
    assert model == ModelConfig(options={"latent_dim": 3})
    assert to_dict(model)["options"] == {"latent_dim": 3}
    with pytest.raises(ConfigError, match="'model.image_channels'"):
        from_dict(ModelConfig, {"image_channels": "3"}, "model")
    assert math.isclose(from_dict(OptimConfig, {"lr": 3}).lr, 3.0)


def test_train_encoder_with_prior_only_fakes_is_refused():
    """Prior samples never pass through the encoder: the switch would silently do nothing."""
    for fake in ("prior", "aggregate"):
        with pytest.raises(ConfigError, match="train_encoder.*no effect.*'both'"):
            ExperimentConfig.from_dict({"adversarial": {"fake": fake, "train_encoder": True}})
    assert ExperimentConfig.from_dict({"adversarial": {"fake": "both", "train_encoder": True}}).adversarial.train_encoder


@pytest.mark.parametrize("section, data, words", [
    ("eval", {"every": -1}, ["eval.every", ">= 0"]),
    ("eval", {"num_samples": 0}, ["eval.num_samples", "positive"]),
    ("eval", {"limit": 0}, ["eval.limit"]),
    ("eval", {"likelihood": "poisson"}, ["eval.likelihood", "'bernoulli'"]),
    ("train", {"compile": "tensorrt"}, ["train.compile", "'inductor'"]),
])
def test_eval_and_speed_settings_are_validated(section, data, words):
    with pytest.raises(ConfigError) as info:
        ExperimentConfig.from_dict({section: data})
    for w in words:
        assert w in str(info.value)


# ---- plugin choices and their options ----------------------------------------------------------


@pytest.mark.parametrize("section", ["model", "discriminator", "losses.0", "data"])
def test_choosing_another_plugin_by_override_starts_its_options_afresh(section):
    """Options belong to the plugin they were written for: a new name drops them, later overrides set new ones."""
    base = apply_overrides(ExperimentConfig(), [f"{section}.options={{a: 1}}"])
    switched = apply_overrides(base, [f"{section}.name=other"])
    node = switched
    for part in section.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    assert node.name == "other" and dict(node.options) == {}
    again = apply_overrides(base, [f"{section}.name=other", f"{section}.options.b=2"])
    node = again
    for part in section.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    assert dict(node.options) == {"b": 2}
    kept = apply_overrides(ExperimentConfig(), ["model.options={latent_dim: 3}", "model.name=conv"])
    assert dict(kept.model.options) == {"latent_dim": 3}  # the same plugin keeps its options


def test_the_recipe_trains_the_mlp_by_name(tmp_path):
    """`vaegan train recipes/configs/vaegan_mnist.yaml model.name=mlp`: the conv options do not follow."""
    cfg = load_config(Path(__file__).parents[1] / "recipes" / "configs" / "vaegan_mnist.yaml", ["model.name=mlp"])
    assert cfg.model.name == "mlp" and dict(cfg.model.options) == {}


# ---- vaegan 0.1's model keys ------------------------------------------------------------------------


LEGACY = {"arch": "conv", "latent_dim": 8, "channels": [8, 16], "norm_groups": 4}


def test_legacy_model_keys_in_a_file_load_with_a_warning_showing_the_new_form(tmp_path):
    path = _write_yaml(tmp_path / "old.yaml", {"model": LEGACY})
    with pytest.warns(DeprecationWarning) as record:
        cfg = load_config(path)
    message = str(record[0].message)
    assert "model: {name: conv, options: {" in message and "latent_dim: 8" in message and "channels: [8, 16]" in message
    assert cfg.model.name == "conv"
    assert dict(cfg.model.options) == {"latent_dim": 8, "channels": [8, 16], "norm_groups": 4}
    with pytest.warns(DeprecationWarning):  # the same through from_dict and as an override
        assert ExperimentConfig.from_dict({"model": LEGACY}) == cfg
    with pytest.warns(DeprecationWarning):
        assert apply_overrides(ExperimentConfig(), ["model.arch=conv", "model.latent_dim=8", "model.channels=[8, 16]",
                                                   "model.norm_groups=4"]) == cfg


def test_legacy_keys_map_per_architecture_and_ignore_what_0_1_ignored():
    with pytest.warns(DeprecationWarning):
        mlp = ModelConfig.normalize_config({"arch": "mlp", "mlp_hidden": [64], "channels": [8], "latent_dim": 3}, "model")
    assert mlp["name"] == "mlp" and mlp["options"] == {"hidden": [64], "latent_dim": 3}  # channels: conv only
    with pytest.warns(DeprecationWarning):
        conv = ModelConfig.normalize_config({"arch": "conv", "mlp_hidden": [64], "res_blocks": 1}, "model")
    assert conv["options"] == {"res_blocks": 1}
    with pytest.warns(DeprecationWarning):  # an override of arch switches a conv file to the mlp, keeping latent_dim
        switched = apply_overrides(ExperimentConfig(), ["model.options={latent_dim: 3, channels: [8]}", "model.arch=mlp"])
    assert switched.model.name == "mlp" and dict(switched.model.options) == {"latent_dim": 3}
    with pytest.raises(ConfigError, match="keep only name"):
        ModelConfig.normalize_config({"name": "mlp", "arch": "conv"}, "model")


def test_legacy_model_keywords_and_attributes_in_python():
    with pytest.warns(DeprecationWarning, match="ModelConfig"):
        cfg = ModelConfig(latent_dim=3, channels=(8, 16), norm_groups=4)
    assert cfg == ModelConfig(options={"latent_dim": 3, "channels": (8, 16), "norm_groups": 4})
    with pytest.warns(DeprecationWarning, match=r"options\['latent_dim'\]"):
        assert cfg.latent_dim == 3
    with pytest.warns(DeprecationWarning, match="ModelConfig.name"):
        assert cfg.arch == "conv"
    with pytest.raises(AttributeError, match="res_blocks"), pytest.warns(DeprecationWarning):
        cfg.res_blocks  # noqa: B018 - not set: the generator's default applies
    with pytest.raises(AttributeError):
        cfg.no_such_field  # noqa: B018


@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), ("90", 90.0), (1.5, 1.5), ("45:00", 2700.0), ("23:30:00", 84600.0), ("1-00:30:00", 88200.0),
    ("2-00", 172800.0), ("1-12:30", 131400.0),
])
def test_durations_take_seconds_or_slurm_clocks(value, seconds):
    from vaegan.config.values import parse_duration

    assert parse_duration(value, "train.max_time") == seconds
    cfg = ExperimentConfig.from_dict({"train": {"max_time": value}})  # YAML reads 23:30:00 as 84600 itself
    assert parse_duration(cfg.train.max_time, "train.max_time") == seconds


@pytest.mark.parametrize("value, words", [
    ("soon", "a duration.*23:30:00"), ("-5", "greater than zero"), (0, "greater than zero"), ("12:75", "duration"),
    ("1-", "duration"), (True, "float or str"), (float("inf"), "float or str"),  # refused by the type check first
])
def test_bad_durations_name_the_key_and_the_forms(value, words):
    with pytest.raises(ConfigError, match=rf"'train.max_time' must be .*{words}"):
        ExperimentConfig.from_dict({"train": {"max_time": value}})


def test_warning_signals_are_catchable_and_not_the_stop_signals():
    assert ExperimentConfig.from_dict({"train": {"warning_signal": "SIGUSR2"}}).train.warning_signal == "SIGUSR2"
    assert ExperimentConfig.from_dict({"train": {"warning_signal": None}}).train.warning_signal is None
    for bad, words in (("KILL", "catch"), ("NOPE", "catch"), ("TERM", "differ from INT and TERM"),
                       ("INT", "differ from INT and TERM")):
        with pytest.raises(ConfigError, match=words):
            ExperimentConfig.from_dict({"train": {"warning_signal": bad}})
    for key, value in (("checkpoint_every_minutes", -1), ("progress_seconds", float("nan")), ("progress", "bars")):
        with pytest.raises(ConfigError, match=key):
            ExperimentConfig.from_dict({"train": {key: value}})


def test_the_scheduler_flags_set_their_config_keys():
    import argparse

    from vaegan.cli import add_train_flags, config_from_flags

    parser = argparse.ArgumentParser()
    add_train_flags(parser)
    cfg = config_from_flags(parser.parse_intermixed_args(["--resume", "auto", "--max-time", "1-00:00:00", "--requeue"]))
    assert (cfg.train.resume, cfg.train.max_time, cfg.train.requeue) == ("auto", "1-00:00:00", True)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8))


def test_a_yaml_alias_bomb_is_refused_at_once_in_one_paragraph(tmp_path):
    """Ten lines that the safe loader would expand to 9^9 strings (gigabytes, minutes): refused at the first alias."""
    import time

    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert time.perf_counter() - t0 < 1.0
    msg = str(err.value)
    assert f"Config file '{path}' is refused: it uses the alias *a (line 2)" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match="Override 'train.x=.*': the value is refused: it uses the alias"):
        apply_overrides(ExperimentConfig(), ["train.x=[&y 1, *y]"])


@pytest.mark.parametrize("text", ["train: {epochs: [1\n", "train: !!python/object/apply:os.system [ls]\n",
                                  "train:\n  epochs: 1\n   bad: 2\n"])
def test_every_yaml_error_is_one_paragraph(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"Config file '{path}' is not valid YAML: ") and "\n" not in str(err.value)


def test_an_option_flag_with_a_yaml_tag_is_one_paragraph():
    from vaegan.cli_handlers import _options

    with pytest.raises(ConfigError) as err:
        _options(["k=!!python/name:os.system"])
    assert str(err.value).startswith("--option 'k=!!python/name:os.system': the value is not valid YAML")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("override, suggestion", [
    ("train.epoch=1", "Did you mean 'epochs'?"),
    ("train.bach_size=8", "Did you mean 'batch_size'?"),
    ("modle.name=conv", "Did you mean 'model'?"),
    ("losses=[{name: lpip}]", "Did you mean 'lpips'?"),  # a plugin name
    ("losses=[{name: kl, options: {free_bit: 0.5}}]", "Did you mean 'free_bits'?"),  # a plugin option
])
def test_a_mistyped_key_or_name_gets_the_close_match(override, suggestion):
    from vaegan.config import apply_overrides
    from vaegan.errors import PluginError
    from vaegan.objective import Objective

    with pytest.raises((ConfigError, PluginError)) as err:
        Objective.from_config(apply_overrides(ExperimentConfig(), [override]))
    assert suggestion in str(err.value)


def test_no_suggestion_when_nothing_is_close():
    from vaegan.errors import did_you_mean

    assert did_you_mean(["zzz"], ["epochs", "batch_size"]) == ""
    assert did_you_mean(["epoch", "lr"], ["epochs", "lr_g"]) == " Did you mean 'epochs' for 'epoch', 'lr_g' for 'lr'?"
