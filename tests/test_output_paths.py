"""The one check of an output file's path (adaptive_depth.files.check_output_path), used before any
work by predict, calibrate and the benchmarks (issue 30)."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest

from adaptive_depth import files
from adaptive_depth.files import OutputPathError, check_output_path


def test_a_writable_place_is_accepted_and_nothing_is_left_there(tmp_path: Path) -> None:
    assert check_output_path(tmp_path / "table.json") == tmp_path / "table.json"
    (tmp_path / "old.json").write_text("{}")
    assert check_output_path(tmp_path / "old.json") == tmp_path / "old.json"  # overwriting is allowed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["old.json"]  # the probe is gone


def test_missing_parents_are_refused_unless_asked_to_create_them(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "table.json"
    with pytest.raises(OutputPathError, match="output folder .*b does not exist; create it first"):
        check_output_path(target)
    assert not (tmp_path / "a").exists()
    assert check_output_path(target, create_parents=True) == target
    assert target.parent.is_dir() and list(target.parent.iterdir()) == []


@pytest.mark.parametrize("create_parents", [False, True])
def test_a_folder_or_a_file_in_the_way_is_one_line(tmp_path: Path, create_parents: bool) -> None:
    (tmp_path / "a_file").write_text("x")
    for path, message in ((tmp_path, "is a folder; give a file name"),
                          (tmp_path / "a_file" / "table.json", "a_file is a file, not a folder"),
                          (tmp_path / "a_file" / "deeper" / "table.json", "a_file is a file, not a folder")):
        with pytest.raises(OutputPathError, match=message) as error:
            check_output_path(path, create_parents=create_parents)
        assert "\n" not in str(error.value) and isinstance(error.value, ValueError)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a_file"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_a_folder_where_nothing_can_be_written_is_one_line(code: int, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise OSError(code, f"refused ({errno.errorcode[code]})")

    monkeypatch.setattr(files.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(OutputPathError, match=f"cannot write in {re.escape(str(tmp_path))} \\(refused") as error:
        check_output_path(tmp_path / "table.json")
    assert "\n" not in str(error.value) and "Errno" not in str(error.value)


@pytest.mark.parametrize("script, argv", [
    ("calibrated", ["--run", "smartbert=missing-run"]),
    ("heads", ["--run", "smartbert=missing-run"]),
    ("seeds", ["missing-table.json"]),
    ("training_cost", ["--model", "missing-model"]),
    ("certify_splits", ["missing-model", "--input", "missing.tsv"]),
])
def test_the_benchmarks_check_their_output_file_before_any_work(script: str, argv: list[str], tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    """A folder as the output file: one line and exit status 2 before the runs, tables or model
    (all missing here) are read."""
    import importlib

    main = importlib.import_module(f"benchmarks.{script}").main
    try:
        status = main([*argv, "--json", str(tmp_path)])
    except SystemExit as exited:  # argparse's parser.error
        status = exited.code
    err = capsys.readouterr().err
    assert status == 2 and f"output {tmp_path} is a folder" in err and "missing" not in err
    assert "Traceback" not in err
