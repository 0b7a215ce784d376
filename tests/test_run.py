"""`pdiff run`: the whole method in one command that continues where it stopped.

Every stage once, a finished run's rerun and a stop during training continued are tested where the README
uses them: tests/test_readme.py runs its set-up command (`pdiff run`) that way.
"""

from __future__ import annotations

import pytest


def test_run_refuses_bad_config_before_any_stage(tmp_path, run_cli):
    proc = run_cli("run", f"output_dir={tmp_path / 'out'}", "task.param.k=abc")
    assert proc.returncode == 2 and "task.param.k=abc: expected an integer" in proc.stderr and not (tmp_path / "out").exists()


def test_a_rerun_with_other_settings_is_refused_not_handed_the_old_stages(tmp_path):
    """`pdiff run` records the settings of its first finished stage; a rerun that asks for another run is refused
    (it would skip every finished stage), one that differs only in keys that change no result is not."""
    from pdiff.commands.run import RUN_RECORD, check_same_settings
    from pdiff.config import ConfigError
    from pdiff.io import write_json

    record = tmp_path / RUN_RECORD
    settings = {"task.param.k": 12, "train.log_every": 10, "--num-models": 4}
    check_same_settings(record, settings)  # no record yet: a first run
    write_json(record, settings)
    check_same_settings(record, {**settings, "train.log_every": 3})
    with pytest.raises(ConfigError, match=r"holds a pdiff run made with other settings \(task.param.k: 12 there, 20 now\)"):
        check_same_settings(record, {**settings, "task.param.k": 20})
    with pytest.raises(ConfigError, match=r"--num-models: 4 there, 6 now"):
        check_same_settings(record, {**settings, "--num-models": 6})
