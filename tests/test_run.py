"""`pdiff run`: the whole method in one command that continues where it stopped.

Every stage once, a finished run's rerun and a stop during training continued are tested where the README
uses them: tests/test_readme.py runs its set-up command (`pdiff run`) that way.
"""

from __future__ import annotations


def test_run_refuses_bad_config_before_any_stage(tmp_path, run_cli):
    proc = run_cli("run", f"output_dir={tmp_path / 'out'}", "task.param.k=abc")
    assert proc.returncode == 2 and "task.param.k=abc: expected an integer" in proc.stderr and not (tmp_path / "out").exists()
