"""A killed stage's temporaries are removed by the stage's next run: only its own outputs'
ones, and only those of processes that are gone (a concurrently running stage's stay)."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipeline import _io

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from stages import _stage  # noqa: E402

#: stages that write outputs (summary only prints)
WRITERS = sorted(p.stem for p in (ROOT / "stages").glob("*.py") if not p.stem.startswith("_") and p.stem != "summary")


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def live_child():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def temp_of(path: Path, pid: int | None, *, old: bool = False, is_dir: bool = True) -> Path:
    pid_part = "" if pid is None else f"{pid}."
    p = path.parent / f"{_io.temp_prefix(path)}{pid_part}k3j_x9qa{'.old' if old else ''}{_io.TMP_SUFFIX}"
    p.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        p.mkdir()
        (p / "half-written").write_bytes(b"x")
    else:
        p.write_bytes(b"x")
    return p


def test_every_writing_stage_cleans_its_temps_first():
    for name in WRITERS:
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        calls = [c.func.id for c in ast.walk(main) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
        assert "remove_stale_temps" in calls, f"stages/{name}.py main() does not remove stale temporaries"


def test_stale_temps_removed_live_and_others_kept(tmp_path, live_child, capsys, monkeypatch):
    from stages import export, intervene

    monkeypatch.chdir(tmp_path)  # outputs() are relative paths
    if True:
        run = _stage.prompt_dir("p")
        stale = [
            temp_of(run / "graph", dead_pid()),  # a killed export's graph folder
            temp_of(run / "graph", dead_pid(), old=True),  # ... and the old one moved aside
            temp_of(run / "graph.png", dead_pid(), is_dir=False),
            temp_of(run / "graph.svg", None),  # written before pids were in the names
        ]
        kept = [
            temp_of(run / "graph", live_child),  # another export writing right now
            temp_of(run / "graph", os.getpid()),  # this process's own
            temp_of(run / "report", dead_pid()),  # intervene's: not export's to remove
            temp_of(run / "report", live_child),
            run / ".graph.json.tmp",  # no temporary name of pipeline._io
        ]
        kept[-1].write_text("x")
        removed = _stage.remove_stale_temps(*export.outputs("p"))
        assert sorted(removed) == sorted(stale)
        assert not any(p.exists() for p in stale)
        assert all(p.exists() for p in kept)
        assert "removed 4 stale temporaries" in capsys.readouterr().out
        # intervene's run: its dead temp goes, the live one stays
        assert _stage.remove_stale_temps(*intervene.outputs("p")) == [kept[2]]
        assert kept[3].exists()


def test_killed_writer_temp_kept_while_alive_removed_after(tmp_path):
    """A real writer inside pipeline._io.atomic_path: its temporary carries its pid; cleaning
    while it runs keeps it, after SIGKILL it is removed."""
    target = tmp_path / "graph"
    code = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from pipeline import _io
        with _io.atomic_path({str(target)!r}) as tmp:
            tmp.mkdir()
            (tmp / "part").write_text("x")
            print("writing", flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "writing"
        (temp,) = tmp_path.iterdir()
        assert _io.temp_owner(temp, target) == proc.pid
        assert _io.remove_stale_temps(target) == [] and temp.exists()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 30
    while _io.pid_alive(proc.pid) and time.monotonic() < deadline:  # reaped above; be safe
        time.sleep(0.05)
    assert temp.exists()  # left by the killed writer
    assert _io.remove_stale_temps(target) == [temp]
    assert list(tmp_path.iterdir()) == []


def test_tokenize_stage_removes_its_stale_temps(tiny_gpt2_dir, tmp_path, monkeypatch, live_child):
    from stages import tokenize

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"].update(name=str(tiny_gpt2_dir), dep=str(tiny_gpt2_dir))
    params["prompts"]["items"] = {"p": {"prompt": "the river"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    out = Path("results/p/tokens.safetensors")
    stale = temp_of(out, dead_pid(), is_dir=True)
    live = temp_of(out, live_child, is_dir=True)
    other = temp_of(Path("results/p/capture.safetensors"), dead_pid(), is_dir=True)  # capture's
    tokenize.main(["--prompt-id", "p"])
    assert out.is_file()
    assert not stale.exists()
    assert live.exists() and other.exists()


def test_temp_names_are_gitignored(tmp_path):
    run = ROOT / "results" / "p"
    names = [
        run / f".graph.{os.getpid()}.abcdefgh.tmp" / "x",
        run / f".graph.png.{os.getpid()}.abcdefgh.tmp",
        ROOT / "data" / "dashboards" / ".plt.zarr.partial" / "state.bin",
        ROOT / "models" / "organism" / f".model.{os.getpid()}.abcdefgh.old.tmp" / "x",
    ]
    out = subprocess.run(
        ["git", "check-ignore", "--no-index", *map(str, names)], cwd=ROOT, capture_output=True, text=True
    )
    if out.returncode == 128:
        pytest.skip(f"not a git checkout: {out.stderr.strip()}")
    assert sorted(out.stdout.split()) == sorted(map(str, names))
