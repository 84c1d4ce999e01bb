"""Safe output: the one way lrpc writes a file the user named (docs/design.md, "Safe output").

Every writer goes through `publish` (or `write_text` / `write_bytes` on top of it). The contract:

- an output that is one of the command's inputs (or an external-data file of one) is refused, even with
  force: callers pass their input paths;
- an existing file is never replaced without force;
- without force the file is created exclusively (`os.link` fails when the name exists), so of two
  concurrent writers to one path exactly one succeeds;
- everything is written first into a temporary folder inside the target folder (same filesystem), named
  `.lrpc-tmp-<pid>-…`; it is removed on every exit path: success, exception (a full disk included) and
  SIGTERM (a handler is installed for the duration and chains the previous one). A SIGKILLed writer's
  folder is removed by the next `publish` into that folder, once its pid is dead;
- files replaced under force are kept as hard links in the temporary folder until the new ones are all in
  place, and restored if anything fails, so a failed write leaves the folder exactly as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
from pathlib import Path
from typing import Callable, Iterable

from lrpc.errors import LrpcError

TEMP_PREFIX = ".lrpc-tmp-"
PathLike = str | os.PathLike


def input_files(*sources) -> list[Path]:
    """The files a command reads for these model sources: each file, the external-data files an ONNX
    file references, and every file inside a folder. Zoo names, protos and missing paths give nothing."""
    found: list[Path] = []
    for source in sources:
        if not isinstance(source, (str, os.PathLike)):
            continue
        path = Path(source)
        if path.is_dir():
            found.extend(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            found.append(path)
            found.extend(_external_data_files(path))
    return found


def _external_data_files(path: Path) -> list[Path]:
    import onnx
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception:  # not ONNX (an image, a plan, a tokenizer): no companions
        return []
    return sorted({path.parent / e.value for t in onnx.external_data_helper._get_all_tensors(proto)
                   if t.data_location == onnx.TensorProto.EXTERNAL for e in t.external_data if e.key == "location"})


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def check_output(path: PathLike, *, force: bool = False, inputs: Iterable[PathLike] = (),
                 companions: Iterable[str] = ()) -> Path:
    """Fail early, with one line, on an output that `publish` would refuse; returns it as a Path.
    companions: other file names the writer puts beside it (an explainer's `.data` file)."""
    path = Path(path)
    inputs = [Path(p) for p in inputs]
    targets = [path, *(path.with_name(c) for c in companions)]
    for target in targets:
        for source in inputs:
            if _same(target, source):
                raise LrpcError(f"refusing to write {target}: it is an input of this command ({source}); "
                                "choose another output path")
    if path.is_dir():
        raise LrpcError(f"{path} is a directory: give a file path such as {path / 'explainer.onnx'}")
    for target in targets:   # a FIFO, a device (/dev/null as root) or a socket is never replaced by a file
        if os.path.lexists(target) and not (target.is_symlink() or stat.S_ISREG(target.stat().st_mode)):
            raise LrpcError(f"{target} is not a regular file (a FIFO, device or socket): lrpc replaces only "
                            "files; choose another output path")
    folder = path.parent
    if not folder.is_dir():
        raise LrpcError(f"output folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise LrpcError(f"output folder {folder} is not writable: choose another output path")
    if not force:
        for target in targets:
            if os.path.lexists(target):
                raise LrpcError(f"{target} already exists: pass --force to overwrite it, or choose another "
                                "output path")
    return path


def clean_stale(folder: PathLike) -> None:
    """Remove temporary entries of lrpc writers that died (SIGKILL, power loss) in `folder`."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        pid = _owner(entry.name)
        if pid is not None and pid != os.getpid() and not _alive(pid):
            _remove(entry)


def _owner(name: str) -> int | None:
    if not name.startswith(TEMP_PREFIX):
        return None
    head = name[len(TEMP_PREFIX):].split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()


class _Terminated(BaseException):
    """Raised by our SIGTERM handler so that every `finally` on the way out runs."""


@contextlib.contextmanager
def on_terminate():
    """For the duration, SIGTERM unwinds the stack (running cleanups) and is then re-delivered to the
    previous handler (the default one ends the process with the usual status)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one unwinding at a time
        raise _Terminated()

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        if callable(previous):
            previous(signal.SIGTERM, None)
            raise SystemExit(128 + signal.SIGTERM) from None
        if previous != signal.SIG_IGN:
            os.kill(os.getpid(), signal.SIGTERM)
        raise SystemExit(128 + signal.SIGTERM) from None
    finally:
        if signal.getsignal(signal.SIGTERM) in (handler, signal.SIG_IGN):
            signal.signal(signal.SIGTERM, previous)


def publish(path: PathLike, write: Callable[[Path], None], *, force: bool = False,
            inputs: Iterable[PathLike] = (), companions: Iterable[str] = ()) -> Path:
    """Call `write(tmp)` with a path in a fresh temporary folder beside `path`, then move what it wrote
    there into place: the companions (files named in `companions`, if written) first, `path` last.
    Nothing of the temporary folder survives; on any failure the target folder is left as it was."""
    inputs = list(inputs)
    companions = list(companions)
    path = check_output(path, force=force, inputs=inputs, companions=companions)
    clean_stale(path.parent)
    with on_terminate():
        tmp = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{os.getpid()}-", dir=path.parent))
        try:
            try:
                write(tmp / path.name)
            except OSError as exc:
                raise LrpcError(f"cannot write {path}: {exc.strerror or exc}") from None
            names = [c for c in companions if (tmp / c).exists()] + [path.name]
            if not (tmp / path.name).exists():
                raise LrpcError(f"internal error: nothing was written for {path}")
            _move_all(tmp, path.parent, names, force)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _move_all(tmp: Path, folder: Path, names: list[str], force: bool) -> None:
    """Move tmp/<name> to folder/<name> for each name; all or nothing."""
    backups = tmp / "replaced"
    backups.mkdir()
    started: list[str] = []
    try:
        for name in names:
            target = folder / name
            started.append(name)  # before acting: a SIGTERM in between still rolls this one back
            if force and os.path.lexists(target):
                os.link(target, backups / name, follow_symlinks=False)
                os.replace(tmp / name, target)
            else:
                try:
                    os.link(tmp / name, target)  # fails if the name exists: the exclusive create
                except FileExistsError:
                    started.pop()
                    raise LrpcError(f"{target} already exists (written meanwhile by another process): pass "
                                    "--force to overwrite it, or choose another output path") from None
    except BaseException:
        for name in reversed(started):
            _roll_back(tmp / name, backups / name, folder / name)
        raise


def _roll_back(written: Path, backup: Path, target: Path) -> None:
    if backup.exists():
        os.replace(backup, target)
    elif written.exists() and target.exists() and os.path.samefile(written, target):
        target.unlink()


def write_text(path: PathLike, text: str, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    return publish(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), force=force, inputs=inputs)


def write_bytes(path: PathLike, data: bytes, *, force: bool = False, inputs: Iterable[PathLike] = ()) -> Path:
    return publish(path, lambda tmp: tmp.write_bytes(data), force=force, inputs=inputs)


def folder(path: PathLike, what: str) -> Path:
    """A folder lrpc keeps its own files in (`--cache`, `--workdir`), created with its parents if missing;
    a file in the way, or a folder that cannot be made, is one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LrpcError(f"{what} {path} is a file, not a folder: give a folder") from None
    except OSError as exc:
        raise LrpcError(f"cannot create {what} folder {path}: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def work_folder(path: PathLike | None, prefix: str):
    """The user's `--workdir` (kept, created if missing), or else a scratch folder removed at the end."""
    if path is not None:
        yield folder(path, "--workdir")
        return
    with scratch_folder(prefix) as scratch:
        yield scratch


@contextlib.contextmanager
def scratch_folder(prefix: str):
    """A temporary working folder (in the system's temp dir) removed on every exit path, SIGTERM included."""
    with on_terminate():
        folder = Path(tempfile.mkdtemp(prefix=prefix))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
