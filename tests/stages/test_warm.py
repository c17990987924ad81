"""The warm stage server (stages/_warm.py): a forked stage writes what its own process writes,
changed code is never served, and a killed client takes its stage down."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the warm server is Linux only")


@pytest.fixture
def checkout(tmp_path):
    """A copy of the code and config a stage needs (split_params: params.yaml -> data/params/)."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("stages", "pipeline", "conf"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "params.yaml", repo / "params.yaml")
    yield repo
    _python(repo, "-m", "stages._warm", "stop")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CIRCUIT_PIPELINE_WARM")}
    return {**env, "CIRCUIT_PIPELINE_WARM_IDLE": "30", **extra}


def _python(repo: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=repo, env=_env(**extra), capture_output=True, text=True)


def _status(repo: Path) -> str:
    return _python(repo, "-m", "stages._warm", "status").stdout


def _start_server(repo: Path) -> int:
    subprocess.Popen(
        [sys.executable, "-m", "stages._warm", "serve"],
        cwd=repo,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while "pid" not in (status := _status(repo)):
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.2)
    return int(status.split("pid ")[1].split(",")[0])


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"


def test_a_stage_in_the_warm_server_writes_the_bytes_its_own_process_writes(checkout):
    alone = _python(checkout, "-m", "stages", "split_params", CIRCUIT_PIPELINE_WARM="0")
    assert alone.returncode == 0, alone.stderr
    expected = _digests(checkout / "data")
    shutil.rmtree(checkout / "data")
    _start_server(checkout)

    warm = _python(checkout, "-m", "stages", "split_params")

    assert warm.returncode == 0, warm.stderr
    assert "1 stages served" in _status(checkout)
    assert warm.stdout == alone.stdout
    assert _digests(checkout / "data") == expected


def test_a_failing_stage_reports_its_error_and_status_through_the_server(checkout):
    (checkout / "params.yaml").write_text("model: [not, a, mapping]\n")
    alone = _python(checkout, "-m", "stages", "split_params", CIRCUIT_PIPELINE_WARM="0")
    _start_server(checkout)

    warm = _python(checkout, "-m", "stages", "split_params")

    assert "1 stages served" in _status(checkout)
    assert alone.returncode == warm.returncode == 1
    assert "ModelSpec" in warm.stderr
    assert warm.stderr.splitlines()[-3:] == alone.stderr.splitlines()[-3:]


def test_the_server_never_runs_changed_code(checkout):
    old = _start_server(checkout)
    stage = checkout / "stages" / "split_params.py"
    stage.write_text(stage.read_text().replace('print(f"', 'print("changed code", f"', 1))

    run = _python(checkout, "-m", "stages", "split_params")

    assert run.returncode == 0, run.stderr
    assert "changed code" in run.stdout  # run by this process, with the new code
    deadline = time.monotonic() + 10
    while _alive(old):
        assert time.monotonic() < deadline, "the stale server kept running"
        time.sleep(0.1)
    deadline = time.monotonic() + 180
    while "pid" not in (status := _status(checkout)):  # the refused stage started the next server
        assert time.monotonic() < deadline, "no new server after the stale one"
        time.sleep(0.2)
    assert f"pid {old}," not in status


def test_killing_the_client_kills_its_stage(checkout):
    server = _start_server(checkout)
    client = subprocess.Popen([sys.executable, "-m", "stages", "split_params"], cwd=checkout, env=_env())
    children = Path(f"/proc/{server}/task/{server}/children")
    deadline = time.monotonic() + 60
    while not (found := children.read_text().split()):
        assert client.poll() is None and time.monotonic() < deadline, "the stage did not start in the server"
    stage = int(found[0])
    os.kill(stage, signal.SIGSTOP)  # it stays alive until someone kills it

    client.send_signal(signal.SIGKILL)
    client.wait()

    deadline = time.monotonic() + 10
    while _alive(stage):
        assert time.monotonic() < deadline, "the stage outlived its client"
        time.sleep(0.05)
    assert "1 stages served" in _status(checkout)  # the server lives on for the next stage


def test_an_unknown_stage_is_named_with_the_ones_there_are(checkout):
    run = _python(checkout, "-m", "stages", "tokenise")
    assert run.returncode == 2
    assert "unknown stage 'tokenise'" in run.stderr and "tokenize" in run.stderr
