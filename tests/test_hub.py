"""Hub ids resolve within a bounded time: behind a network that accepts and never answers (a socket
on 127.0.0.1 that never replies, as ``HF_ENDPOINT``) every entry point gives up with one line
that says how to work offline. Each case runs in a subprocess (huggingface_hub reads its
settings at import) with ``ADAPTIVE_DEPTH_HUB_TIMEOUT=2``."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from adaptive_depth.hub import HUB_TIMEOUT_ENV, HubTimeoutError, fetch_within_deadline, hub_timeout_s
from tests.conftest import requires_minilm
from tests.test_cli_errors import assert_one_line_error, run_module, run_python

SUBPROCESS_LIMIT_S = 120  # the bound the test itself enforces; the deadline under test is 2 s


@pytest.fixture
def silent_hub(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment variables pointing huggingface_hub at a loopback socket that accepts connections
    and never sends a byte (a stalled network), online, with an empty cache."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    server.settimeout(0.2)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield {"HF_ENDPOINT": f"http://127.0.0.1:{server.getsockname()[1]}", "HF_HUB_OFFLINE": "0",
               "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home"), HUB_TIMEOUT_ENV: "2",
               "HF_HUB_ETAG_TIMEOUT": "60", "HF_HUB_DOWNLOAD_TIMEOUT": "60"}
        assert accepted, "the command never reached the silent hub"
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        server.close()


def test_from_pretrained_of_a_hub_id_gives_up_behind_a_silent_network(silent_hub: dict[str, str],
                                                                      tmp_path: Path) -> None:
    code = ("from adaptive_depth import AdaptiveEncoder\n"
            "try:\n    AdaptiveEncoder.from_pretrained('org/model')\n"
            "except FileNotFoundError as error:\n    print(error)\n")
    result = run_python("-c", code, cwd=tmp_path, env=silent_hub, timeout=SUBPROCESS_LIMIT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "there is no folder org/model" in result.stdout and "did not finish within 2 s" in result.stdout
    assert "HF_HUB_OFFLINE=1" in result.stdout and HUB_TIMEOUT_ENV in result.stdout


def test_predict_of_a_hub_id_gives_up_behind_a_silent_network(silent_hub: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "rows.tsv").write_text("sentence\nHi.\n")
    result = run_module("adaptive_depth.predict", "org/model", "--input", "rows.tsv", "--no-progress", cwd=tmp_path,
                        env=silent_hub, timeout=SUBPROCESS_LIMIT_S)
    assert_one_line_error(result, "did not finish within 2 s", "HF_HUB_OFFLINE=1")


@pytest.mark.integration
@requires_minilm
def test_a_recipe_given_a_hub_id_gives_up_behind_a_silent_network(silent_hub: dict[str, str], glue_dir: Path,
                                                                  tmp_path: Path) -> None:
    result = run_module("recipes.smartbert", "--task", "mrpc", "--data-dir", glue_dir, "--model", "org/model",
                        "--output-dir", "run", cwd=tmp_path, env=silent_hub, timeout=SUBPROCESS_LIMIT_S)
    assert_one_line_error(result, "--model org/model", "did not finish within 2 s", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "run").exists()


def test_the_deadline_abandons_a_stalled_fetch_and_passes_errors_through() -> None:
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(HubTimeoutError, match="did not finish within 0.2 s.*HF_HUB_OFFLINE=1"):
        fetch_within_deadline(release.wait, "'org/x' from the Hugging Face Hub", timeout_s=0.2)
    assert time.monotonic() - started < SUBPROCESS_LIMIT_S  # it returned (the worker is a daemon thread)
    release.set()

    def failing() -> None:
        raise KeyError("no such repo")

    with pytest.raises(KeyError, match="no such repo"):
        fetch_within_deadline(failing, "x", timeout_s=5.0)


@pytest.mark.parametrize(("value", "expected"), [(None, 300.0), ("2.5", 2.5), (" 10 ", 10.0)])
def test_hub_timeout_from_the_environment(value: str | None, expected: float, monkeypatch: pytest.MonkeyPatch) -> None:
    if value is None:
        monkeypatch.delenv(HUB_TIMEOUT_ENV, raising=False)
    else:
        monkeypatch.setenv(HUB_TIMEOUT_ENV, value)
    assert hub_timeout_s() == expected


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_hub_timeout_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(HUB_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=f"{HUB_TIMEOUT_ENV}='{value}' must be a positive number of seconds"):
        hub_timeout_s()
