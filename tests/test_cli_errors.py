"""One error surface: user errors print one line (problem and fix) and exit 2; `--debug` re-raises."""
from __future__ import annotations

import pytest

from amoe.cli import main
from distill.errors import AmoeError


@pytest.mark.parametrize("argv", [
    ["bench", "sweep", "/missing/sweep.json"],
    ["ground", "train", "nosuch", "--out", "{tmp}/g"],
    ["distill", "nosuch"],
    ["leaderboard", "build", "--results", "/missing/results", "--out", "{tmp}/lb"],
    ["teachers", "train", "--world", "{tmp}/no-world", "--out", "{tmp}/t"],
    ["encoders", "show", "nokind:x"],
])
def test_user_errors_are_one_line_and_exit_2(argv, tmp_path, capsys):
    rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(AmoeError):
        main(["--debug", "encoders", "show", "nokind:x"])


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("amoe ")


def test_every_user_error_shares_the_base():
    from distill.results import ResultSchemaError
    from benchmarks.suites import SuiteError
    from benchmarks.sweep import SweepConfigError
    from benchmarks.tasks.base import NoUsableHeadError, TaskConfigError, UnknownTaskError
    from distill.curation.manifest import ManifestError
    from distill.data.base import DatasetLayoutError
    from distill.data.safe_pickle import UnsafePickleError
    from distill.encoders.base import MissingHeadError
    from distill.encoders.registry import UnknownEncoderError
    from distill.teachers.common import TeacherError
    from distill.train.config import ConfigError
    for cls in (ResultSchemaError, SuiteError, SweepConfigError, NoUsableHeadError, TaskConfigError,
                UnknownTaskError, ManifestError, DatasetLayoutError, UnsafePickleError, MissingHeadError,
                UnknownEncoderError, TeacherError, ConfigError):
        assert issubclass(cls, AmoeError), cls
