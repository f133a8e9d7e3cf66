"""The entry-point registry: listing without importing, loading, broken and third-party plugins,
the disable switch, and the ``vaegan plugins`` command."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

from vaegan import cli, registry
from vaegan.errors import PluginError

BUILTINS = {
    "vaegan.generators": {"conv": "vaegan.model:ConvVAE", "mlp": "vaegan.model:MLPVAE"},
    "vaegan.losses": {
        "mse": "vaegan.losses.reconstruction:MSELoss",
        "l1": "vaegan.losses.reconstruction:L1Loss",
        "bce": "vaegan.losses.reconstruction:BCELoss",
        "gaussian_nll": "vaegan.losses.reconstruction:GaussianNLLLoss",
        "kl": "vaegan.losses.kl:KLDivergence",
        "smoothness": "vaegan.losses.smoothness:LatentSmoothness",
    },
    "vaegan.adversarial": {"non_saturating": "vaegan.losses.adversarial:NonSaturating"},
    "vaegan.discriminators": {"simple": "vaegan.discriminators:SimpleDiscriminator"},
    "vaegan.datasets": {"mnist": "vaegan.data:mnist", "image_folder": "vaegan.data:image_folder"},
    "vaegan.samplers": {"normal": "vaegan.samplers:NormalSampler"},
}
BROKEN_MODULE = "tests_broken_plugin_module_xyz"


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Run-time registrations and caches never leak between tests (or into other test files)."""
    monkeypatch.delenv(registry.DISABLE_ENV, raising=False)
    saved = {g: dict(v) for g, v in registry._EXTRA.items()}
    registry.refresh()
    yield
    registry._EXTRA.clear()
    registry._EXTRA.update(saved)
    sys.modules.pop(BROKEN_MODULE, None)
    registry.refresh()


@pytest.fixture
def raising_module(tmp_path, monkeypatch) -> str:
    """A real module on sys.path that raises while being imported."""
    name = "tests_raising_plugin_module_xyz"
    (tmp_path / f"{name}.py").write_text("raise RuntimeError('boom while importing the plugin')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def _fake_distribution(root: Path, name: str, entry_points: str) -> None:
    """An installed distribution as importlib.metadata sees it: NAME-VERSION.dist-info on sys.path."""
    info = root / f"{name}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))


# ---- listing ---------------------------------------------------------------------------------------


def test_groups_are_the_documented_ones():
    assert set(registry.GROUPS) == set(BUILTINS)


@pytest.mark.parametrize("group", registry.GROUPS)
def test_available_lists_builtins(group):
    names = registry.available(group)
    assert names == sorted(names)
    assert set(BUILTINS[group]) <= set(names)


def test_available_unknown_group():
    with pytest.raises(PluginError) as info:
        registry.available("vaegan.lossses")
    for g in registry.GROUPS:
        assert g in str(info.value)


@pytest.mark.slow
def test_listing_imports_no_plugin_module():
    code = textwrap.dedent(
        """
        import sys
        from vaegan import registry
        plugin_modules = ["vaegan.losses.smoothness", "vaegan.losses.reconstruction", "vaegan.losses.kl",
                          "vaegan.losses.adversarial", "vaegan_plugins", "vaegan.model"]
        for m in plugin_modules:
            sys.modules.pop(m, None)
        listed = {g: registry.available(g) for g in registry.GROUPS}
        rows = registry.describe(check=False)
        assert all(r.status == "not loaded" for r in rows), rows
        assert "smoothness" in listed["vaegan.losses"], listed
        leaked = [m for m in plugin_modules if m in sys.modules]
        assert not leaked, leaked
        # Loading one name imports exactly that plugin's module.
        registry.load("vaegan.losses", "smoothness")
        assert "vaegan.losses.smoothness" in sys.modules
        assert "vaegan.losses.reconstruction" not in sys.modules
        print("OK", len(rows))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("OK")


# ---- loading ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("group, name", [(g, n) for g, names in BUILTINS.items() for n in names])
def test_load_builtin(group, name):
    obj = registry.load(group, name)
    module, attr = BUILTINS[group][name].split(":")
    assert obj.__module__ == module and obj.__name__ == attr
    assert registry.load(group, name) is obj  # cached


def test_load_unknown_name_lists_installed():
    with pytest.raises(PluginError) as info:
        registry.load("vaegan.losses", "msee")
    msg = str(info.value)
    assert "msee" in msg
    for name in BUILTINS["vaegan.losses"]:
        assert name in msg
    assert isinstance(info.value, LookupError)


def test_register_rejects_unknown_group():
    with pytest.raises(PluginError, match="Unknown plugin group"):
        registry.register("vaegan.loss", "x", "math:sqrt")


def test_register_at_run_time_and_cleanup_fixture():
    registry.register("vaegan.adversarial", "sqrt_alias", "math:sqrt")
    assert "sqrt_alias" in registry.available("vaegan.adversarial")
    assert "sqrt_alias" not in registry.available("vaegan.losses")
    import math

    assert registry.load("vaegan.adversarial", "sqrt_alias") is math.sqrt
    info = [r for r in registry.describe(["vaegan.adversarial"]) if r.name == "sqrt_alias"][0]
    assert info.status == "ok" and info.value == "math:sqrt"
    assert info.distribution == "(registered at run time)"


def test_register_shadows_and_rebinding_is_seen():
    registry.register("vaegan.losses", "mine", "math:sqrt")
    import math

    assert registry.load("vaegan.losses", "mine") is math.sqrt
    registry.register("vaegan.losses", "mine", "math:floor")
    assert registry.load("vaegan.losses", "mine") is math.floor


def test_missing_module_plugin_raises_plugin_error():
    registry.register("vaegan.losses", "broken", f"{BROKEN_MODULE}:Nope")
    assert "broken" in registry.available("vaegan.losses")
    with pytest.raises(PluginError) as info:
        registry.load("vaegan.losses", "broken")
    msg = str(info.value)
    assert "'broken'" in msg and "vaegan.losses" in msg
    assert "ModuleNotFoundError" in msg and BROKEN_MODULE in msg
    assert "mse" in msg  # the names that do work
    assert isinstance(info.value.__cause__, ModuleNotFoundError)


def test_missing_attribute_plugin_raises_plugin_error():
    registry.register("vaegan.losses", "no_attr", "vaegan.losses.kl:NoSuchLoss")
    with pytest.raises(PluginError) as info:
        registry.load("vaegan.losses", "no_attr")
    assert "no_attr" in str(info.value) and "NoSuchLoss" in str(info.value)


def test_plugin_raising_on_import(raising_module):
    registry.register("vaegan.losses", "explodes", f"{raising_module}:Loss")
    with pytest.raises(PluginError) as info:
        registry.load("vaegan.losses", "explodes")
    msg = str(info.value)
    assert "'explodes'" in msg
    assert "RuntimeError: boom while importing the plugin" in msg
    assert raising_module in msg


def test_real_entry_point_object_raising_on_import(raising_module):
    # The same, through a genuine importlib.metadata.EntryPoint placed in the run-time table.
    ep = metadata.EntryPoint(name="explodes_ep", value=f"{raising_module}:Loss", group="vaegan.adversarial")
    registry._EXTRA.setdefault("vaegan.adversarial", {})["explodes_ep"] = ep
    with pytest.raises(PluginError, match="boom while importing"):
        registry.load("vaegan.adversarial", "explodes_ep")


def test_load_all_warns_and_skips_broken(raising_module):
    registry.register("vaegan.losses", "broken", f"{BROKEN_MODULE}:Nope")
    registry.register("vaegan.losses", "explodes", f"{raising_module}:Loss")
    with pytest.warns(UserWarning) as record:
        loaded = registry.load_all("vaegan.losses")
    assert set(loaded) == set(registry.available("vaegan.losses")) - {"broken", "explodes"}
    assert set(BUILTINS["vaegan.losses"]) <= set(loaded)
    text = "\n".join(str(w.message) for w in record)
    assert "'broken'" in text and "'explodes'" in text


def test_load_all_without_broken_plugins_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = registry.load_all("vaegan.datasets")
    assert set(BUILTINS["vaegan.datasets"]) <= set(loaded)


# ---- describe --------------------------------------------------------------------------------------


# Built-ins that report what they lack here (missing_resources): LPIPS's ImageNet backbone weights.
NEEDS = {("vaegan.losses", "lpips"): "needs weights: torchvision's ImageNet file 'alexnet-owt-7be5be79.pth'"}


@pytest.fixture
def empty_torch_cache(tmp_path, monkeypatch) -> Path:
    """An empty torchvision cache: the LPIPS backbone weights are absent, as on a fresh offline machine."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("VAEGAN_LPIPS_BACKBONE", raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_describe_builtins(empty_torch_cache):
    rows = registry.describe()
    by_key = {(r.group, r.name): r for r in rows}
    for group, names in BUILTINS.items():
        for name, value in names.items():
            r = by_key[(group, name)]
            assert r.status.startswith(NEEDS.get((group, name), "ok")), r
            assert r.distribution == "vaegan"
            assert r.value == value
    only = registry.describe(["vaegan.adversarial"], check=False)
    assert {r.group for r in only} == {"vaegan.adversarial"}
    assert all(r.status == "not loaded" for r in only)


def test_a_plugin_whose_weights_are_absent_says_so_with_the_fix(empty_torch_cache, capsys):
    assert cli.main(["plugins", "--group", "vaegan.losses"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("lpips "))
    assert "needs weights:" in row and str(empty_torch_cache) in row and "backbone_path" in row and "alex_st" in row
    empty_torch_cache.mkdir(parents=True)
    (empty_torch_cache / "alexnet-owt-7be5be79.pth").write_bytes(b"")  # present (read when the loss is built)
    assert [r.status for r in registry.describe(["vaegan.losses"]) if r.name == "lpips"] == ["ok"]


def test_describe_reports_errors():
    registry.register("vaegan.losses", "broken", f"{BROKEN_MODULE}:Nope")
    r = [r for r in registry.describe(["vaegan.losses"]) if r.name == "broken"][0]
    assert r.status.startswith("error: ModuleNotFoundError")
    assert BROKEN_MODULE in r.status
    assert r.distribution == "(registered at run time)"


# ---- third-party plugins and the disable switch ----------------------------------------------------


def test_disable_env_blocks_run_time_plugins_not_builtins(monkeypatch):
    registry.register("vaegan.losses", "sqrt_alias", "math:sqrt")
    import math

    assert registry.load("vaegan.losses", "sqrt_alias") is math.sqrt  # cached while enabled
    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    with pytest.raises(PluginError) as info:
        registry.load("vaegan.losses", "sqrt_alias")
    assert registry.DISABLE_ENV in str(info.value) and "sqrt_alias" in str(info.value)
    for group, names in BUILTINS.items():
        for name in names:
            assert registry.load(group, name) is not None
    rows = {r.name: r for r in registry.describe(["vaegan.losses"])}
    assert rows["sqrt_alias"].status == "disabled"
    assert rows["mse"].status == "ok"
    with pytest.warns(UserWarning, match="sqrt_alias"):
        loaded = registry.load_all("vaegan.losses")
    assert "sqrt_alias" not in loaded and "mse" in loaded


@pytest.mark.parametrize("value, disabled", [("1", True), ("true", True), ("YES", True), ("0", False),
                                             ("", False), ("no", False)])
def test_disable_env_values(monkeypatch, value, disabled):
    registry.register("vaegan.losses", "sqrt_alias", "math:sqrt")
    monkeypatch.setenv(registry.DISABLE_ENV, value)
    if disabled:
        with pytest.raises(PluginError, match=registry.DISABLE_ENV):
            registry.load("vaegan.losses", "sqrt_alias")
    else:
        import math

        assert registry.load("vaegan.losses", "sqrt_alias") is math.sqrt


def test_installed_third_party_distribution_refresh_and_disable(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "tp_vaegan_plugin_xyz"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from vaegan.api import LossTerm\n"
        "class Zero(LossTerm):\n"
        "    def forward(self, inputs):\n"
        "        return inputs.real.sum() * 0\n"
    )
    _fake_distribution(site, "tp-vaegan-plugin-xyz", """
        [vaegan.losses]
        zero_tp = tp_vaegan_plugin_xyz:Zero
    """)
    assert "zero_tp" not in registry.available("vaegan.losses")  # cached before the install
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])
    importlib.invalidate_caches()
    monkeypatch.delitem(sys.modules, "tp_vaegan_plugin_xyz", raising=False)
    assert "zero_tp" not in registry.available("vaegan.losses")  # still the cached metadata
    registry.refresh()
    assert "zero_tp" in registry.available("vaegan.losses")
    cls = registry.load("vaegan.losses", "zero_tp")
    assert cls.__name__ == "Zero"
    row = [r for r in registry.describe(["vaegan.losses"]) if r.name == "zero_tp"][0]
    assert row.distribution == "tp-vaegan-plugin-xyz" and row.status == "ok"

    monkeypatch.setenv(registry.DISABLE_ENV, "1")
    with pytest.raises(PluginError) as info:
        registry.load("vaegan.losses", "zero_tp")
    assert "tp-vaegan-plugin-xyz" in str(info.value)
    assert registry.load("vaegan.losses", "kl").__name__ == "KLDivergence"


def test_third_party_name_clash_warns_and_first_wins(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_distribution(site, "tp-clash-xyz", """
        [vaegan.losses]
        mse = math:sqrt
    """)
    monkeypatch.setattr(sys, "path", [*sys.path, str(site)])  # after site-packages: vaegan's mse comes first
    importlib.invalidate_caches()
    registry.refresh()
    with pytest.warns(UserWarning, match="registered twice"):
        names = registry.available("vaegan.losses")
    assert names.count("mse") == 1
    assert registry.load("vaegan.losses", "mse").__name__ == "MSELoss"


def test_refresh_clears_caches():
    registry.available("vaegan.losses")
    registry.load("vaegan.losses", "mse")
    assert registry._installed.cache_info().currsize >= 1
    assert registry._load_cached.cache_info().currsize >= 1
    registry.refresh()
    assert registry._installed.cache_info().currsize == 0
    assert registry._load_cached.cache_info().currsize == 0
    assert "mse" in registry.available("vaegan.losses")


# ---- the CLI ---------------------------------------------------------------------------------------


def test_cli_plugins_lists_builtins(capsys, empty_torch_cache):
    assert cli.main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "group", "distribution", "status"]
    rows = {tuple(line.split()[:2]): line.split() for line in lines[1:]}
    for group, names in BUILTINS.items():
        for name in names:
            row = rows[(name, group)]
            assert row[2] == "vaegan" and " ".join(row[3:]).startswith(NEEDS.get((group, name), "ok"))


def test_cli_plugins_group_and_no_check(capsys):
    assert cli.main(["plugins", "--group", "vaegan.datasets", "--no-check"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    listed = sorted(line.split()[0] for line in lines)
    assert listed == sorted(registry.available("vaegan.datasets")) and set(BUILTINS["vaegan.datasets"]) <= set(listed)
    assert all(line.split()[1] == "vaegan.datasets" and line.endswith("not loaded") for line in lines)


def test_cli_plugins_shows_broken_plugin(capsys):
    registry.register("vaegan.losses", "broken", f"{BROKEN_MODULE}:Nope")
    assert cli.main(["plugins", "--group", "vaegan.losses"]) == 0
    out = capsys.readouterr().out
    line = [ln for ln in out.splitlines() if ln.startswith("broken ")][0]
    assert "error: ModuleNotFoundError" in line


def test_cli_plugins_rejects_unknown_group(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["plugins", "--group", "vaegan.nope"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs():
    exe = Path(sys.executable).with_name("vaegan")
    script = str(exe) if exe.exists() else shutil.which("vaegan")
    assert script, "the `vaegan` console script is not installed"
    # --no-check reads metadata only: the import-and-check path is covered in-process above, and
    # importing every plugin (LPIPS, torchvision models) in a fresh interpreter costs seconds.
    res = subprocess.run([script, "plugins", "--no-check"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for group, names in BUILTINS.items():
        for name in names:
            assert any(line.split() == [name, group, "vaegan", "not", "loaded"]
                       for line in res.stdout.splitlines()), name


# A plugin of every group with a base class that builds something else: a plain dict, say.
@pytest.mark.parametrize("group", sorted(registry.BASES))
def test_a_plugin_that_builds_the_wrong_kind_of_object_is_refused_naming_the_base(group):
    registry.register(group, "not_a_plugin", "builtins:dict")
    context = {"vaegan.generators": {"image_shape": (1, 28, 28), "output_range": "unit"},
               "vaegan.discriminators": {"image_shape": (1, 28, 28)}, "vaegan.samplers": {"latent_shape": (4,)}}
    with pytest.raises(PluginError, match=rf"built a dict, not a {registry.BASES[group].replace(':', '.')}"):
        registry.build_plugin(group, "not_a_plugin", {}, **context.get(group, {}))
