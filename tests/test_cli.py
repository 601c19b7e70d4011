"""The ``mvar-engine`` command: configuration precedence, validation, exit codes, end-to-end runs."""

from __future__ import annotations

import importlib.util
import json
import os
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from conftest import small_models
from mvar_engine.models.checkpoint import save_state_dict
from mvar_engine.apps.cli import main, parse_generate_args
from mvar_engine.core.errors import ConfigError, UsageError


def test_defaults_follow_the_trajectory():
    config = parse_generate_args([])
    assert (config.trajectory.name, config.attention.name, config.cache.name, config.backend.name) == (
        "markov", "neighborhood", "none", "auto")
    config = parse_generate_args(["--trajectory", "full"])
    assert (config.attention.name, config.cache.name) == ("dense", "full")


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('trajectory = "markov"\n[attention]\nname = "neighborhood"\nkernel_size = 5\ndilation = 2\n'
                    '[sampling]\ncfg = 3.0\ntop_k = 10\n')
    config = parse_generate_args(["--config", str(path), "--cfg", "2", "--attention-kernel-size", "3"])
    assert config.sampling.cfg == 2.0 and config.sampling.top_k == 10
    assert config.attention.options == {"kernel_size": "3", "dilation": 2}
    # picking another pattern drops the file's options for the old one
    config = parse_generate_args(["--config", str(path), "--attention", "dense"])
    assert config.attention.name == "dense" and config.attention.options == {}


def test_json_config_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"trajectory": {"name": "markov", "order": 2}, "cache": "window", "labels": [3, 4]}))
    config = parse_generate_args(["--config", str(path)])
    assert config.trajectory.options == {"order": 2} and config.cache.name == "window" and config.labels == [3, 4]


@given(top_p=st.floats(1.01, 100), top_k=st.integers(-100, -1))
def test_validation_names_each_field(top_p, top_k):
    with pytest.raises(ConfigError) as info:
        parse_generate_args(["--top-p", str(top_p), "--top-k", str(top_k)])
    lines = str(info.value).splitlines()
    assert len(lines) == 2
    assert any(line.startswith("sampling.top_p:") for line in lines)
    assert any(line.startswith("sampling.top_k:") for line in lines)


def test_bad_config_file_is_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("trajectory = [unclosed")
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_generate_args(["--config", str(path)])


@pytest.mark.parametrize("argv,needle", [
    (["--cache", "windw"], "did you mean 'window'? available: ams, full, h2o, lines, none, scalekv, sink, ssd, window"),
    (["--attention", "neighborhod"], "did you mean 'neighborhood'"),
    (["--attention-kernel-size", "0"], "option kernel_size: Input should be greater than or equal to 1"),
    (["--trajectory-order", "x"], "option order: Input should be a valid integer"),
    (["--cache", "full"], "makes no sense under trajectory 'markov'"),
    (["--dtype", "float8"], "dtype: Input should be 'float32', 'bfloat16' or 'float16'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--backend", "nope"], "unknown attention backend 'nope'"),
    (["--var-checkpoint", "x.pth"], "give both --checkpoint and --tokenizer"),
])
def test_usage_errors_exit_2_with_one_line(argv, needle, capsys):
    assert main(argv + ["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar-engine: error: ") and needle in err[0], err


def test_debug_shows_the_traceback():
    with pytest.raises(UsageError):
        main(["--cache", "windw", "--debug"])


def test_unavailable_backend_is_refused_with_its_reason(capsys):
    assert main(["--backend", "xformers", "--random-weights", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "backend 'xformers' is unavailable" in err and ("CUDA" in err or "not installed" in err)


def test_plugins_json_lists_every_builtin(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = {(c["kind"], c["name"]) for c in data["components"]}
    for kind, name in [("trajectory", "full"), ("trajectory", "markov"), ("attention", "dense"),
                       ("attention", "neighborhood"), ("cache", "none"), ("cache", "full"), ("cache", "window"),
                       ("backend", "reference"), ("backend", "sdpa"), ("backend", "natten"), ("backend", "xformers"),
                       ("backend", "flash-attn")]:
        assert (kind, name) in names
    by_name = {c["name"]: c for c in data["components"] if c["kind"] == "backend"}
    if not torch.cuda.is_available():
        for name in ("xformers", "flash-attn"):
            assert by_name[name]["available"] is False and by_name[name]["reason"]
    assert by_name["sdpa"]["provider"]["package"] == "mvar-engine"


def test_plugins_table(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["KIND", "NAME", "PROVIDER", "AVAILABLE"]
    assert "neighborhood" in out


@pytest.fixture
def checkpoints(tmp_path):
    patch_nums = (1, 2, 3, 4)
    model, tok = small_models(patch_nums, num_classes=4)
    var_path, vae_path = tmp_path / "var.pth", tmp_path / "vae.safetensors"
    torch.save({"trainer": {"var_wo_ddp": model.state_dict()}}, var_path)
    save_state_dict(tok.state_dict(), vae_path)
    return ["--var-checkpoint", str(var_path), "--vae-checkpoint", str(vae_path), "--patch-nums", "1,2,3,4"]


@pytest.mark.parametrize("combo", [["--trajectory", "markov", "--attention", "neighborhood", "--cache", "none",
                                    "--attention-kernel-size", "3"],
                                   ["--trajectory", "full", "--attention", "dense", "--cache", "full"]])
def test_main_commands_write_a_grid(tmp_path, checkpoints, combo, capsys):
    out = tmp_path / "grid.png"
    tokens = tmp_path / "tokens.pt"
    argv = combo + checkpoints + ["--labels", "0,3", "--samples-per-label", "3", "--output", str(out),
                                  "--save-tokens", str(tokens), "--per-image", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)  # 3 columns, 2 rows of 8x8 images (4x4 latent, 2x upsampling), 2 px padding
    saved = torch.load(tokens)
    assert saved["labels"].tolist() == [0, 0, 0, 3, 3, 3]
    assert [saved[f"tokens.{s}"].shape[1] for s in range(4)] == [1, 4, 9, 16]
    assert len(list((tmp_path / "grid").glob("*.png"))) == 6
    assert "wrote" in capsys.readouterr().out


def test_same_seed_same_png(tmp_path, checkpoints):
    args = checkpoints + ["--labels", "1", "--samples-per-label", "2", "--no-progress", "--seed", "5"]
    assert main(args + ["--output", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--output", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


def test_label_out_of_range(checkpoints, capsys):
    assert main(checkpoints + ["--labels", "9", "--no-progress"]) == 2
    assert "this model has classes 0..3" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten is not installed")
def test_forced_backend_that_cannot_run_a_step_is_one_line(tmp_path, checkpoints, capsys):
    argv = ["--trajectory", "full", "--attention", "dense", "--cache", "full", "--backend", "natten"] + checkpoints + [
        "--labels", "0", "--samples-per-label", "1", "--output", str(tmp_path / "x.png"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "natten" in err and "--backend" in err
    assert not (tmp_path / "x.png").exists()


def test_sdpa_options_are_flags(tmp_path, checkpoints, capsys):
    argv = ["--trajectory", "markov", "--attention-kernel-size", "3", "--backend", "sdpa", "--backend-tiled", "always",
            "--backend-tile", "2"] + checkpoints + ["--labels", "0", "--samples-per-label", "1", "--output",
                                                    str(tmp_path / "x.png"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert main(argv[:-1] + ["--backend-tiled", "sometimes"]) == 2
    assert "tiled" in capsys.readouterr().err


def test_missing_default_weights_is_one_line(monkeypatch, tmp_path, capsys):
    from mvar_engine.models import default_models

    monkeypatch.setattr(default_models, "WEIGHTS_DIR", tmp_path)
    assert main(["--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no default weights for trajectory 'markov'" in err[0] and "--checkpoint" in err[0]


def test_raster_trajectory_generates_with_random_weights(tmp_path, capsys):
    out = tmp_path / "raster.png"
    argv = ["--trajectory", "raster", "--random-weights", "--depth", "1", "--patch-nums", "2", "--labels", "0,1",
            "--samples-per-label", "2", "--output", str(out), "--save-tokens", str(tmp_path / "t.pt"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "raster/causal/full" in capsys.readouterr().out
    assert Image.open(out).size == (2 * (32 + 2) + 2, 2 * (32 + 2) + 2)  # 2x2 tokens, 16x upsampling
    assert torch.load(tmp_path / "t.pt")["tokens.0"].shape == (4, 4)


def test_random_raster_models_have_llamagen_b_and_vq16_sizes():
    from mvar_engine.apps.model_options import RasterOptions
    from mvar_engine.apps.pipeline import build_models

    model, tokenizer = build_models(RasterOptions(random_weights=True))
    c = model.config
    assert (c.depth, c.width, c.heads, tuple(c.grid)) == (12, 768, 12, (24, 24))
    assert model.vocab_size == tokenizer.vocab_size == 16384  # LlamaGen VQ-16's codebook
    assert tokenizer.config.ch == 128 and tokenizer.config.downsample == 16 and tokenizer.config.z_channels == 8


@pytest.mark.parametrize("argv, needle, shipped", [
    (["--attention", "neighborhood", "--random-weights"], "describes next-scale steps, not the next-token steps", True),
    ([], "no default weights for trajectory 'raster'", False),
    (["--random-weights", "--patch-nums", "1,2"], "one grid side", True),
])
def test_raster_bad_input_is_one_line(argv, needle, shipped, capsys, monkeypatch, tmp_cwd):
    if not shipped:  # an installation without the raster weights
        from mvar_engine.models import default_models

        monkeypatch.setattr(default_models, "DEFAULT_TRANSFORMERS",
                            {k: v for k, v in default_models.DEFAULT_TRANSFORMERS.items() if k != "raster"})
    assert main(["--trajectory", "raster", "--no-progress"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


# ------------------------------------------------- plugins: duplicate names, errors in plugin code


class _FakeDist:
    def __init__(self, name: str, version: str = "1.0"):
        self.name, self.version = name, version


class _FakeEntryPoint:
    """An installed plugin as ``importlib.metadata.entry_points`` returns it."""

    def __init__(self, name: str, dist: str, target):
        self.name, self.value, self.dist, self._target = name, f"{dist.replace('-', '_')}.plugin", _FakeDist(dist), target

    def load(self):
        return self._target


@pytest.fixture
def install_plugins(monkeypatch):
    """``install_plugins(name=hooks, ...)``: third-party plugins (distribution ``pkg-NAME``) that
    ``get_registry()`` discovers, as if pip-installed, for the rest of the test."""
    import types

    from mvar_engine import hookimpl
    from mvar_engine.core import registry as registry_module

    def install(**plugins):
        eps = []
        for name, hooks in plugins.items():
            module = types.ModuleType(name)
            for hook, function in hooks.items():
                setattr(module, hook, hookimpl(function))
            eps.append(_FakeEntryPoint(name, f"pkg-{name}", module))
        monkeypatch.delenv(registry_module.ENV_DISABLE_AUTOLOAD, raising=False)
        monkeypatch.delenv(registry_module.ENV_ALLOW, raising=False)
        monkeypatch.setattr(registry_module.metadata, "entry_points", lambda **kwargs: list(eps))
        registry_module.reset_registry()

    yield install
    from mvar_engine.core.registry import reset_registry

    reset_registry()


def _caches(*records):
    return {"mvar_engine_cache_policies": lambda: list(records)}


def _full_cache_record(name, factory=None):
    from mvar_engine import CachePolicyRecord
    from mvar_engine.plugins.caches import FullCache

    return CachePolicyRecord(name=name, factory=factory or FullCache, description=f"{name} from a plugin")


def test_a_duplicated_name_lists_both_entries_and_using_it_exits_2(install_plugins, capsys):
    install_plugins(shadow=_caches(_full_cache_record("window")))
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    windows = [c for c in data["components"] if (c["kind"], c["name"]) == ("cache", "window")]
    assert [w["provider"]["package"] for w in windows] == ["mvar-engine", "pkg-shadow"]
    assert all(w["available"] is False and w["conflicts"] for w in windows)
    assert main(["plugins"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("cache ")]
    assert [row[2] for row in rows if row[1] == "window"] == ["mvar-engine", "pkg-shadow"]

    assert main(["--trajectory", "full", "--attention", "dense", "--cache", "window", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar-engine: error: cache policy 'window' is registered by both"), err
    assert "mvar-engine" in err[0] and "pkg-shadow" in err[0] and "pip uninstall pkg-shadow" in err[0]


def test_an_unused_duplicate_breaks_no_other_run(install_plugins, tmp_path, checkpoints, capsys):
    install_plugins(shadow=_caches(_full_cache_record("window")))
    argv = ["--trajectory", "full", "--attention", "dense", "--cache", "full"] + checkpoints + [
        "--labels", "0", "--samples-per-label", "1", "--output", str(tmp_path / "x.png"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "x.png").exists()


def test_an_exception_in_a_plugin_factory_names_component_and_provider(install_plugins, checkpoints, capsys):
    from mvar_engine.core.errors import ComponentFailedError

    def factory(options):
        raise RuntimeError("boom in factory")

    install_plugins(boom=_caches(_full_cache_record("boom", factory)))
    argv = ["--trajectory", "full", "--attention", "dense", "--cache", "boom", "--no-progress"] + checkpoints
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["mvar-engine: error: cache policy 'boom' (from pkg-boom 1.0) failed: RuntimeError: boom in factory "
                   "(rerun with --debug for the traceback)"]
    with pytest.raises(ComponentFailedError) as info:  # --debug: the traceback, down to the factory
        main(argv + ["--debug"])
    assert isinstance(info.value.__cause__, RuntimeError) and "boom" in str(info.value)


def _raising_cache(options=None):
    from mvar_engine.plugins.caches import FullCache

    class RaisingCache(FullCache):
        def update(self, layer, k, v, spans):
            raise RuntimeError("boom in update")

    return RaisingCache(options)


def _raising_pattern(options=None):
    from mvar_engine.plugins.patterns import DensePattern

    class RaisingPattern(DensePattern):
        def spec(self, *args, **kwargs):
            raise RuntimeError("boom in spec")

    return RaisingPattern(options)


@pytest.mark.parametrize("kind, flag, label", [("cache", "--cache", "cache policy"),
                                               ("attention", "--attention", "attention pattern")])
def test_an_exception_in_a_plugin_method_names_component_and_provider(kind, flag, label, install_plugins, tmp_path,
                                                                      checkpoints, capsys):
    from mvar_engine import AttentionPatternRecord, CachePolicyRecord

    if kind == "cache":
        install_plugins(boom=_caches(CachePolicyRecord(name="boom", factory=_raising_cache)))
    else:
        install_plugins(boom={"mvar_engine_attention_patterns": lambda: [
            AttentionPatternRecord(name="boom", factory=_raising_pattern)]})
    components = {"--trajectory": "full", "--attention": "dense", "--cache": "full", flag: "boom"}
    argv = [part for pair in components.items() for part in pair] + checkpoints + [
        "--labels", "0", "--samples-per-label", "1", "--output", str(tmp_path / "x.png"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"mvar-engine: error: {label} 'boom' (from pkg-boom 1.0) failed: RuntimeError: boom in "), err
    assert err[0].endswith("(rerun with --debug for the traceback)") and "Traceback" not in err[0]
    with pytest.raises(RuntimeError, match="boom in"):  # --debug: the original exception and its traceback
        main(argv + ["--debug"])


def test_help_lists_every_subcommand_from_the_hook(install_plugins, capsys):
    from mvar_engine.apps import cli

    install_plugins(extra={"mvar_engine_register_commands": lambda commands: commands.add(
        "zz-added-command", lambda argv: 0, "a plugin's command")})
    names = cli.load_commands().names()
    assert {"generate", "plugins", "bench", "train", "evaluate", "profile-heads", "zz-added-command"} <= set(names)
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = out.split("subcommands:", 1)[1].split("\n\n", 1)[0]
    assert [name.strip() for name in listed.replace("\n", " ").split(",")] == names


def test_a_plugin_command_runs_and_a_plugin_bench_joins_the_group(install_plugins, capsys):
    calls = []

    def register(commands):
        commands.add("hello", lambda argv: calls.append(("hello", list(argv))) or 0, "say hello")
        commands.add("mine", lambda argv: calls.append(("mine", list(argv))) or 3, "my benchmark", group="bench")

    install_plugins(extra={"mvar_engine_register_commands": register})
    assert main(["hello", "--x"]) == 0 and main(["bench", "mine", "1"]) == 3
    assert calls == [("hello", ["--x"]), ("mine", ["1"])]
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "my benchmark" in capsys.readouterr().out
    assert main(["bench", "nope"]) == 2
    assert "unknown bench command 'nope'" in capsys.readouterr().err


def test_a_plugin_command_taking_a_builtin_name_is_a_broken_plugin(install_plugins, capsys):
    install_plugins(clash={"mvar_engine_register_commands": lambda commands: commands.add(
        "train", lambda argv: 0, "shadows the built-in")})
    assert main(["plugins"]) == 0
    assert "broken plugin" in capsys.readouterr().out


@pytest.mark.parametrize("bench", ["attention", "train", "matrix", "cache"])
def test_bench_help_cites_no_issue(bench, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", bench, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and not re.search(r"issue|#\d", out, re.IGNORECASE), out


def test_a_next_token_only_cache_under_full_is_refused_in_one_line(install_plugins, capsys, tmp_cwd):
    """Compatibility comes from the traits a plugin declares, not its name (exit 2, before any model)."""
    from mvar_engine import CachePolicyRecord
    from mvar_engine.plugins.caches import FullCache

    class TokenOnly(FullCache):
        families = ("next-token",)

    install_plugins(tokenonly=_caches(CachePolicyRecord(name="token-only", factory=lambda options: TokenOnly())))
    assert main(["--trajectory", "full", "--cache", "token-only", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cache 'token-only' serves next-token trajectories, not trajectory 'full'" in err[0], err
    assert not (tmp_cwd / "outputs").exists()


def test_a_plugin_model_family_runs_through_the_one_engine(install_plugins, capsys, tmp_cwd):
    """A fifth component kind: a package adds a model family (here one wrapping the shipped raster
    GPT) without touching the engine; it is listed, chosen with --model-adapter, and checked."""
    import torch

    from mvar_engine import ModelAdapterRecord
    from mvar_engine.apps.model_families import RasterFamily
    from mvar_engine.apps.model_options import RasterOptions

    class MyRaster(RasterFamily):
        name = "my-raster"

    install_plugins(mine={"mvar_engine_model_adapters": lambda: [
        ModelAdapterRecord(name="my-raster", factory=MyRaster, family="next-token", options=RasterOptions,
                           description="a plugin's family")]})
    assert main(["plugins", "--kind", "model"]) == 0
    assert "my-raster" in capsys.readouterr().out
    common = ["--trajectory", "raster", "--labels", "3", "--samples-per-label", "2", "--no-progress"]
    assert main([*common, "--model-adapter", "my-raster", "--output", "a.png", "--save-tokens", "a.pt"]) == 0
    assert main([*common, "--output", "b.png", "--save-tokens", "b.pt"]) == 0
    assert torch.equal(torch.load("a.pt")["tokens.0"], torch.load("b.pt")["tokens.0"])
    capsys.readouterr()
    assert main(["--trajectory", "full", "--model-adapter", "my-raster", "--no-progress"]) == 2
    assert "but the model generates next-token" in capsys.readouterr().err


class _ExitingEntryPoint(_FakeEntryPoint):
    """A plugin whose import raises ``error`` (``sys.exit(3)``, a ``KeyboardInterrupt``, ...)."""

    def __init__(self, name: str, error: BaseException):
        super().__init__(name, f"pkg-{name}", None)
        self._error = error

    def load(self):
        raise self._error


def _exit(code):
    def hook(*args, **kwargs):
        raise SystemExit(code)
    return hook


@pytest.mark.parametrize("command", [["plugins", "--json"], ["--labels", "0", "--samples-per-label", "1",
                                                             "--output", "x.png", "--no-progress"]])
def test_a_plugin_that_exits_or_is_interrupted_is_listed_broken_and_spares_the_command(
        command, install_plugins, monkeypatch, tmp_cwd, capsys):
    """Plugin code may raise anything: sys.exit(3) on import, KeyboardInterrupt on import, SystemExit
    in a record hook and in the command hook. Each plugin is listed broken with its error; every
    command still runs and exits 0."""
    from mvar_engine.core import registry as registry_module

    install_plugins(hooks_exit={"mvar_engine_cache_policies": _exit(4)},
                    commands_exit={"mvar_engine_register_commands": _exit(5)})
    installed = registry_module.metadata.entry_points()
    eps = installed + [_ExitingEntryPoint("imports_exit", SystemExit(3)),
                       _ExitingEntryPoint("imports_interrupted", KeyboardInterrupt())]
    monkeypatch.setattr(registry_module.metadata, "entry_points", lambda **kwargs: list(eps))
    registry_module.reset_registry()
    assert main(command) == 0, capsys.readouterr().err
    broken = {b.provider.plugin: b.error for b in registry_module.get_registry().broken}
    assert set(broken) == {"hooks_exit", "commands_exit", "imports_exit", "imports_interrupted"}, broken
    assert "SystemExit: 3" in broken["imports_exit"] and "KeyboardInterrupt" in broken["imports_interrupted"]
    assert "SystemExit: 4" in broken["hooks_exit"] and "SystemExit: 5" in broken["commands_exit"]
    if command[0] == "plugins":
        listed = {b["provider"]["plugin"] for b in json.loads(capsys.readouterr().out)["broken"]}
        assert listed == set(broken)
    else:
        assert (tmp_cwd / "x.png").is_file()


def test_a_plugin_factory_that_calls_sys_exit_is_a_one_line_failure(install_plugins, capsys):
    """sys.exit in a third-party component's factory is that component failing (exit 1, one line
    naming it), not the command leaving with the plugin's status."""
    install_plugins(exiting=_caches(_full_cache_record("exiting-cache", factory=_exit(7))))
    status = main(["--trajectory", "full", "--attention", "dense", "--cache", "exiting-cache", "--labels", "0",
                   "--samples-per-label", "1", "--output", os.devnull, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(err) == 1, (status, err)
    assert "exiting-cache" in err[0] and "pkg-exiting" in err[0] and "SystemExit: 7" in err[0], err
