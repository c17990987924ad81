"""A warm interpreter for DVC stages: import torch, TransformerLens and the library once, fork per stage.

A stage is a short computation behind seconds of imports, and DVC starts a fresh Python for
each of a prompt set's stages. ``python -m stages NAME`` (the command dvc.yaml runs) asks a
server serving this checkout to fork a child that runs ``stages/NAME.py`` as ``__main__``,
with the client's working directory, environment, arguments and standard streams; the client
waits and exits with the child's status. Forking copies a process that has imported modules
and run nothing else, so the child computes what a fresh interpreter computes.

* No server yet: the client starts one in the background and runs this stage itself.
* The server refuses (and exits) once a repository module it imported changed on disk, or the
  installed packages did; it exits after ``CIRCUIT_PIPELINE_WARM_IDLE`` seconds (60) with no stage.
* A client that dies (Ctrl-C, ``kill -9`` of DVC) takes its stage down with it: the server
  kills the child's process group when the client's connection closes.
* ``CIRCUIT_PIPELINE_WARM=0`` runs every stage in its own process. Linux only (an abstract
  Unix socket, named after the checkout, the interpreter and the import-relevant environment;
  only the same user's processes are served); elsewhere stages run in their own process.

``python -m stages._warm serve|status|stop`` starts a server in the foreground, says whether
one serves this checkout, or stops it.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import traceback
from pathlib import Path

SWITCH = "CIRCUIT_PIPELINE_WARM"
IDLE = "CIRCUIT_PIPELINE_WARM_IDLE"
DEFAULT_IDLE_S = 60.0
#: environment variables read at import time by torch, transformers, TransformerLens or Python
#: itself: a server only serves clients that agree with it on these
_IMPORT_ENV = ("PYTHON", "HF_", "TRANSFORMERS", "TORCH", "OMP_", "MKL_", "CUDA", "TOKENIZERS", "CIRCUIT_PIPELINE")
#: heavy modules the stages import inside functions
_PREIMPORT = ("torch", "transformers", "transformer_lens", "transformers.models.gpt2.modeling_gpt2", "zarr")
_STAGES_DIR = Path(__file__).resolve().parent
_HEADER = struct.Struct("!I")


def stage_names() -> list[str]:
    """The stages ``python -m stages NAME`` runs: the modules of stages/ not starting with ``_``."""
    return sorted(p.stem for p in _STAGES_DIR.glob("*.py") if not p.stem.startswith("_"))


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get(SWITCH, "1") != "0"


def address(cwd: str | None = None) -> bytes:
    """The abstract socket of the server for this checkout, interpreter and import environment."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith(_IMPORT_ENV) and not k.startswith(SWITCH))
    ident = [os.path.realpath(cwd or os.getcwd()), sys.executable, sys.prefix, os.getuid(), env]
    return b"\0circuit-pipeline-warm-" + hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32].encode()


# ---------------------------------------------------------------------------- client
def run_stage(argv: list[str]) -> int:
    """``python -m stages NAME [ARGS]``: run a stage, in the warm server when one serves this checkout."""
    names = stage_names()
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m stages NAME [ARGS]   (NAME: {', '.join(names)}; NAME --help for its arguments)")
        return 0 if argv else 2
    name, args = argv[0], argv[1:]
    if name not in names:
        print(f"unknown stage {name!r}: one of {', '.join(names)}", file=sys.stderr)
        return 2
    if enabled():
        code = _run_in_server(name, args)
        if code is not None:
            return code
        _start_server()
    return _run_here(name, args)


def _run_here(name: str, args: list[str]) -> int:
    sys.argv = [str(_STAGES_DIR / f"{name}.py"), *args]
    runpy.run_module(f"stages.{name}", run_name="__main__", alter_sys=True)
    return 0


def _send(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [payload], fds)
    else:
        sock.sendall(payload)


def _recv(sock: socket.socket, maxfds: int = 0) -> tuple[dict | None, list[int]]:
    """One message (None when the peer closed first) and the descriptors that came with it."""
    fds: list[int] = []
    if maxfds:
        buf, fds, _, _ = socket.recv_fds(sock, 1 << 16, maxfds)
    else:
        buf = sock.recv(1 << 16)
    while len(buf) < _HEADER.size or len(buf) < _HEADER.size + _HEADER.unpack_from(buf)[0]:
        more = sock.recv(1 << 16)
        if not more:
            return None, fds
        buf += more
    (n,) = _HEADER.unpack_from(buf)
    return json.loads(buf[_HEADER.size : _HEADER.size + n]), fds


def _connect() -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address())
    except OSError:
        sock.close()
        return None
    return sock


def _run_in_server(name: str, args: list[str]) -> int | None:
    """The stage's exit status from the server, or None when no server took it (run it here)."""
    sock = _connect()
    if sock is None:
        return None
    with sock:
        try:
            request = {"op": "run", "name": name, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}
            _send(sock, request, [0, 1, 2])
            reply, _ = _recv(sock)
            if reply is None or reply.get("status") != "started":
                return None  # refused (its code changed) or gone before starting: nothing ran
            done, _ = _recv(sock)
        except OSError:
            return None
    if done is None:
        print(
            f"the warm stage server stopped while running stage {name}: rerun it ({SWITCH}=0 runs stages in their own process)",
            file=sys.stderr,
        )
        return 1
    return int(done["code"])


def _start_server() -> None:
    """Start a server for this checkout in the background (a second one started at once exits)."""
    try:
        subprocess.Popen(
            [sys.executable, "-m", "stages._warm", "serve"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
    except OSError:
        pass  # no server: every stage runs in its own process, as without one


# ---------------------------------------------------------------------------- server
def _code_state() -> dict[str, tuple[int, int]]:
    """(mtime, size) of every repository module loaded here and of the installed packages' folders."""
    root, venv = os.path.realpath(os.getcwd()) + os.sep, os.path.realpath(sys.prefix) + os.sep
    files = set()
    for module in list(sys.modules.values()):
        path = os.path.realpath(getattr(module, "__file__", None) or "")
        if path.startswith(root) and not path.startswith(venv):  # a venv inside the checkout: see below
            files.add(path)
    files |= {str(p) for p in _STAGES_DIR.glob("*.py")}
    files |= {p for p in sys.path if p.startswith(sys.prefix) and os.path.isdir(p)}
    state = {}
    for f in sorted(files):
        try:
            st = os.stat(f)
        except OSError:
            st = None
        state[f] = (st.st_mtime_ns, st.st_size) if st else (-1, -1)
    return state


def serve(idle_s: float | None = None) -> None:
    """Import everything the stages need, then fork one child per stage request until idle."""
    idle_s = float(os.environ.get(IDLE, DEFAULT_IDLE_S)) if idle_s is None else idle_s
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address())  # before importing: a second server started at the same time exits at once
    except OSError:
        return
    for module in _PREIMPORT + tuple(f"stages.{n}" for n in stage_names()):
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a stage that cannot import fails the same way when it runs
            pass
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    code = _code_state()
    served = 0
    sock.listen(16)
    sock.settimeout(idle_s)
    with sock:
        while True:
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                return
            conn.settimeout(None)
            with conn:
                try:
                    if not _same_user(conn):
                        continue
                    request, fds = _recv(conn, maxfds=3)
                except OSError:
                    continue
                try:
                    if request is None or len(fds) != 3:
                        continue
                    if request.get("op") == "status":
                        _send(conn, {"pid": os.getpid(), "files": len(code), "served": served})
                        continue
                    if request.get("op") == "stop" or _code_state() != code:
                        sock.close()  # first: the client starts the next server at once
                        _send(conn, {"status": "stopping"})
                        return
                    served += 1
                    pid = os.fork()
                    if pid == 0:
                        sock.close()
                        _child(conn, request, fds)
                    os.setpgid(pid, pid)  # here too: the client may go before the child has run a line
                except OSError:  # the client went away: serve the next one
                    continue
                finally:
                    for fd in fds:
                        os.close(fd)
                _supervise(conn, pid)


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] == os.getuid()


def _supervise(conn: socket.socket, pid: int) -> None:
    """Tell the client the stage started, wait for it and send its exit status; kill the
    stage's process group if the client goes away first."""
    pidfd = os.pidfd_open(pid)
    try:
        try:
            _send(conn, {"status": "started", "pid": pid})
        except OSError:
            pass  # gone already: the select below sees it
        while True:
            ready, _, _ = select.select([conn.fileno(), pidfd], [], [])
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
                try:
                    _send(conn, {"code": code if code >= 0 else 128 - code})
                except OSError:
                    pass
                return
            try:
                gone = not conn.recv(1, socket.MSG_PEEK)
            except OSError:  # reset: it died with our "started" unread
                gone = True
            if gone:  # the client closed: it was killed or interrupted
                for kill in (os.killpg, os.kill):
                    try:
                        kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                os.waitpid(pid, 0)
                return
    finally:
        os.close(pidfd)


def _child(conn: socket.socket, request: dict, fds: list[int]) -> None:
    """In the forked child: become the client's process (streams, cwd, environment, argv) and run the stage."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group, so the server can kill everything the stage started
        conn.close()
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        # new stream objects: the server's were opened on /dev/null (block-buffered, not a tty)
        sys.stdin = os.fdopen(0, "r", closefd=False)
        sys.stdout = os.fdopen(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)
        sys.stderr = os.fdopen(2, "w", buffering=1, errors="backslashreplace", closefd=False)
        name = request["name"]
        sys.modules.pop(f"stages.{name}", None)  # it runs as __main__, as in a fresh interpreter
        try:
            code = _run_here(name, list(request["args"]))
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - report it as the interpreter would, then exit 1
            traceback.print_exc()
            code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - the client's stream may be gone
                pass
        os._exit(code)


def _ask(op: str, timeout_s: float = 10.0) -> dict | None:
    """The server's answer to ``op``; ``{"busy": True}`` while it runs a stage (it serves one at a time)."""
    sock = _connect()
    if sock is None:
        return None
    with sock:
        sock.settimeout(timeout_s)
        try:
            _send(sock, {"op": op}, [0, 1, 2])
            reply, _ = _recv(sock)
        except TimeoutError:
            return {"busy": True}
        return reply


def main(argv: list[str]) -> int:
    op = argv[0] if argv else ""
    if op == "serve":
        serve()
        return 0
    if op in ("status", "stop"):
        reply = _ask(op)
        where = os.path.realpath(os.getcwd())
        if reply is None:
            print(f"no warm stage server for {where}")
        elif reply.get("busy"):
            print(f"the warm stage server for {where} is running a stage; ask again when it has finished")
        elif op == "status":
            print(
                f"warm stage server for {where}: pid {reply['pid']}, {reply['served']} stages served, "
                f"watching {reply['files']} files for changes"
            )
        else:
            print(f"stopped the warm stage server for {where}")
        return 0
    print("usage: python -m stages._warm serve|status|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
