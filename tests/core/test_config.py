"""The one configuration object: typed sections, environment variables, flat overrides, typos."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsvc.core.config import SETTINGS, Config, unknown_variables


def test_defaults_and_sections():
    config = Config()
    assert config.serving.max_n == 100 and config.redis.url is None and config.api_keys == ()
    assert config.events.stream == "recsvc:events" and config.bundles.size == 3
    assert config.models_dir == Path("models")


def test_environment_is_read_into_sections_with_types():
    config = Config.from_env(
        {
            "REDIS_URL": "redis://h:1/0",
            "RECSVC_MAX_N": "50",
            "RECSVC_API_KEYS": "a-long-key, another-key",
            "RECSVC_BUNDLE_SAME_CATEGORY": "yes",
            "RECSVC_REDIS_SOCKET_TIMEOUT_S": "0.25",
            "RECSVC_EXPERIMENTS_FILE": "exp.toml",
            "RECSVC_MODELS_DIR": "/srv/models",
        }
    )
    assert config.redis.url == "redis://h:1/0" and config.serving.max_n == 50
    assert config.api_keys == ("a-long-key", "another-key")
    assert config.bundles.same_category is True and config.redis.socket_timeout_s == 0.25
    assert config.experiments.file == Path("exp.toml") and config.models_dir == Path("/srv/models")


def test_a_bad_value_names_the_variable():
    with pytest.raises(ValueError, match="RECSVC_MAX_N='many' is not a valid int"):
        Config.from_env({"RECSVC_MAX_N": "many"})
    with pytest.raises(ValueError, match="RECSVC_BUNDLE_SAME_CATEGORY"):
        Config.from_env({"RECSVC_BUNDLE_SAME_CATEGORY": "perhaps"})


def test_flat_overrides_reach_their_section_and_unknown_names_are_refused():
    config = Config.create(max_n=5, redis_url="redis://x", history_length=7, models_dir="m")
    assert (config.serving.max_n, config.redis.url, config.events.history_length) == (5, "redis://x", 7)
    assert config.models_dir == Path("m")
    assert config.with_overrides(max_n=6).serving.max_n == 6 and config.serving.max_n == 5
    with pytest.raises(TypeError, match="did you mean max_n"):
        config.with_overrides(max_nn=3)


def test_every_setting_has_one_variable_and_environment_wins_over_defaults_only():
    envs = [s.env for s in SETTINGS.values()]
    # Besides RECSVC_*: REDIS_URL, and prometheus-client's own PROMETHEUS_MULTIPROC_DIR.
    outside = {"REDIS_URL", "PROMETHEUS_MULTIPROC_DIR"}
    assert len(envs) == len(set(envs)) and all(e in outside or e.startswith("RECSVC_") for e in envs)
    assert Config.from_env({"RECSVC_MAX_N": "9"}, max_n=3).serving.max_n == 3  # overrides win


def test_unknown_variables_are_reported_with_a_suggestion():
    warnings = unknown_variables(
        {"RECSVC_API_KEY": "k", "RECSVC_MAX_N": "5", "PATH": "/bin", "RECSVC_ZZZ": ""}
    )
    assert warnings == [
        "RECSVC_API_KEY is not a recsvc setting (did you mean RECSVC_API_KEYS?)",
        "RECSVC_ZZZ is not a recsvc setting",
    ]


def test_the_app_and_the_command_line_warn_at_start_up(monkeypatch, caplog, make_config):
    import logging

    from click.testing import CliRunner

    from recsvc.cli import main
    from recsvc.web.app import create_app

    monkeypatch.setenv("RECSVC_API_KEY", "typo")
    with caplog.at_level(logging.WARNING):
        app = create_app(make_config())
    app.extensions["recsvc"].client.close()
    assert "RECSVC_API_KEY is not a recsvc setting (did you mean RECSVC_API_KEYS?)" in caplog.text
    result = CliRunner().invoke(main, ["versions", "--help"])
    assert result.exit_code == 0
    assert "warning: RECSVC_API_KEY is not a recsvc setting" in result.stderr
