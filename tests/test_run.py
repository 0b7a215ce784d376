"""`pdiff run`: the whole method in one command that continues where it stopped."""

from __future__ import annotations


# Every stage once, a finished run's rerun, and a stop during training continued: tests/test_readme.py runs
# them as the README's set-up command.


def test_run_refuses_bad_config_before_any_stage(tmp_path, run_cli):
    proc = run_cli("run", f"output_dir={tmp_path / 'out'}", "task.param.k=abc")
    assert proc.returncode == 2 and "task.param.k=abc: expected an integer" in proc.stderr and not (tmp_path / "out").exists()
