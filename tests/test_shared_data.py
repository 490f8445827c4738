"""Missing shared data skips the tests that read it on a laptop, and fails them in CI (``CI=true``):
a CI run that skipped every test on real data would pass without having checked them."""

from __future__ import annotations

import pytest

from .conftest import ONESEC, in_ci, missing_shared_data, needs_data, pytest_runtest_setup


class _Item:
    """The part of a pytest item that the setup hook reads: its markers."""

    def __init__(self, *marks):
        self.marks = [m.mark for m in marks]

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)


@pytest.mark.parametrize("value, ci", [("true", True), ("1", True), ("", False), ("false", False), ("0", False)])
def test_ci_is_read_from_the_environment(monkeypatch, value, ci):
    monkeypatch.setenv("CI", value)
    assert in_ci() is ci


def test_missing_data_fails_in_ci_and_skips_elsewhere(monkeypatch, tmp_path):
    gone = needs_data(tmp_path / "no-such-folder", "no data here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no data here"):
        pytest_runtest_setup(_Item(gone))
    with pytest.raises(pytest.fail.Exception, match="no data here"):
        missing_shared_data("no data here")  # what the onesec fixture calls
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match="no data here"):
        pytest_runtest_setup(_Item(gone))
    with pytest.raises(pytest.skip.Exception, match="no data here"):
        missing_shared_data("no data here")


def test_present_data_runs_the_test(monkeypatch, tmp_path):
    monkeypatch.setenv("CI", "true")
    pytest_runtest_setup(_Item(needs_data(tmp_path)))  # tmp_path exists: neither skipped nor failed


def test_integration_tests_are_marked_with_the_data_they_read():
    """The OneSec marker names the folder the onesec fixture loads, so both follow one rule."""
    from .conftest import needs_shared_data

    assert needs_shared_data.mark.kwargs["path"] == ONESEC
