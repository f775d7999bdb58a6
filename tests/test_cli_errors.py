"""The command line tells a user's error (one line, exit 2) from a bug in fastnig (traceback, exit 1)."""
from __future__ import annotations

import pytest

from fastnig.cli import compare_cmd, run_cmd
from fastnig.cli.usage import USER_ERRORS, is_user_error


def _fail_with(exc):
    def fail(*args, **kwargs):
        raise exc
    return fail


@pytest.mark.parametrize("exc", [ValueError("settings must be an AttributionSettings"), TypeError("bad operand"),
                                 KeyError("P_ms"), RuntimeError("tensor mismatch")])
def test_an_internal_error_shows_its_traceback_and_exits_1(exc, cli, monkeypatch, tmp_path):
    """A ValueError / TypeError raised deep inside is a bug, not bad input: before, it was printed as
    `fastnig compare: error: ...` with exit code 2 and no traceback."""
    monkeypatch.setattr(compare_cmd, "scorecard", _fail_with(exc))
    code, _, err = cli("compare", tmp_path)
    assert code == 1, err
    assert "Traceback (most recent call last)" in err and f"{type(exc).__name__}: " in err
    assert err.strip().splitlines()[-1].startswith(f"fastnig compare: internal error ({type(exc).__name__}): "
                                                   "this is a bug in fastnig")


def test_an_internal_type_error_of_the_plan_is_a_bug(cli, monkeypatch):
    monkeypatch.setattr(run_cmd, "plan_config", _fail_with(TypeError("unsupported operand type(s)")))
    code, _, err = cli("run", "paper", "--plan")
    assert code == 1 and "Traceback" in err and "TypeError: unsupported operand type(s)" in err


@pytest.mark.parametrize("kind", USER_ERRORS, ids=lambda k: k.__name__)
def test_user_errors_are_one_line_with_exit_2(kind, cli, monkeypatch, tmp_path):
    monkeypatch.setattr(compare_cmd, "scorecard", _fail_with(kind("the run folder x has no config.json\n"
                                                                  "  (write it first)")))
    code, out, err = cli("compare", tmp_path)
    assert code == 2
    assert err == "fastnig compare: error: the run folder x has no config.json (write it first)\n"
    assert out == ""


def test_a_failed_operation_on_a_named_file_is_one_line(cli, monkeypatch, tmp_path):
    monkeypatch.setattr(compare_cmd, "scorecard", _fail_with(PermissionError(13, "Permission denied", "/runs/x")))
    code, _, err = cli("compare", tmp_path)
    assert code == 2 and err.startswith("fastnig compare: error: [Errno 13] Permission denied: '/runs/x'")
    assert len(err.strip().splitlines()) == 1
    assert is_user_error(FileNotFoundError(2, "No such file", "a.json")) and not is_user_error(OSError("no name"))


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_user_error_too(where, cli):
    args = ["run", "paper", "--plan", "--device", "v100"]
    code, _, err = cli(*(["--debug", *args] if where == "before" else [*args, "--debug"]))
    assert code == 2
    assert "Traceback (most recent call last)" in err and "UsageError" in err
    assert err.strip().splitlines()[-1] == ("fastnig run: error: --device 'v100' is not one of "
                                            "['a100', 'h100', 'h200', 'l4', 't4']")
    code, _, err = cli(*args)  # without --debug: the one line alone
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, words", [
    (["compare", "RUN", "--reference", "nope"], "--reference 'nope' is not one of the packaged references"),
    (["analyze", "RUN", "-o", "OUT", "--levels", "0"], "--levels must be in (0, 100]"),
    (["analyze", "RUN", "-o", "OUT", "--layer-percent", "200"], "--layer-percent must be in (0, 100]"),
    (["attribute", "--model", "no-such-model", "--dataset", "cranfield", "--label", "relevant", "--out", "OUT",
      "--pairs", "0"], "--pairs must be >= 1"),
    (["attribute", "--model", "no-such-model", "--dataset", "cranfield", "--label", "relevant", "--out", "OUT",
      "--chunk-pairs", "0"], "--chunk-pairs must be >= 1"),
    (["run", "paper", "--plan", "--model", "someone/unknown-model"], "not a known shape"),
])
def test_bad_values_that_lower_layers_checked_are_user_errors(args, words, cli, tmp_path):
    """Values that reached a lower layer's plain ValueError (an internal error now) are checked where
    the subcommand takes them, or raised as a user-error type by the lower layer (the plan's ConfigError)."""
    args = [str(tmp_path / a) if a in ("RUN", "OUT") else a for a in args]
    code, _, err = cli(*args)
    assert code == 2, err
    assert words in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_resume_with_other_settings_is_a_user_error_and_other_errors_are_bugs(cli, saved_tiny_model, tmp_path,
                                                                               monkeypatch):
    """The check of the scheme already at --out (attribution_job.open_scheme) raises a plain ValueError:
    `fastnig attribute` turns exactly that one into a one-line user error."""
    import fastnig.study.attribution_job as job

    model = saved_tiny_model(0)

    def attribute(out, *options):
        return cli("attribute", "--model", model, "--dataset", "cranfield", "--label", "relevant", "--out", out,
                   "--pairs", "2", "--steps", "4", "--no-filter", "--device", "cpu", "--quiet", *options)

    out = tmp_path / "P_cran"
    code, _, err = attribute(out)
    assert code == 0, err
    code, _, err = attribute(out, "--rule", "left")
    assert code == 2 and "Traceback" not in err  # (ir_datasets may log a line before it)
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"fastnig attribute: error: --out {out}: cannot resume") and "'rule'" in last
    # The same kind of error from elsewhere in the job is a bug: its traceback, exit code 1.
    monkeypatch.setattr(job, "attribute", _fail_with(ValueError("layer x: expected a [batch, tokens] output")))
    code, _, err = attribute(tmp_path / "P_other")
    assert code == 1 and "Traceback" in err and "ValueError: layer x: expected" in err
