"""What the ``numbabn`` commands share: settings, the error type, the lazy group, the
one-line error rule and the output-file rules.

Only click (and the standard library) is imported here: loading the CLI and rendering
``--help`` must not import Numba, PyTorch or matplotlib (that would cost seconds per
invocation).

Errors: every failure the user can fix (a bad option, an output that cannot be
written, not enough memory, no GPU) is ONE line ``Error: ...`` on stderr and exit
code 2 -- click's usage errors included (their "Usage:"/"Try ..." lines are dropped).

Outputs (``bench --json/--csv/--plot FILE``, ``experiment --out DIR``) follow one rule:
the directory an output goes into must already exist; numbabn creates at most the last
path component (the file, or the ``--out`` directory itself). Each output is checked
before any work starts, and written all-or-nothing at the end: a regular file is
written to a temporary file beside it and renamed over it, so a failed write leaves
the previous file as it was. Two outputs of one command may not name the same file.
An ``--out`` run whose files were all written but cannot move into DIR (a directory
there named like one of them) keeps them in its staging directory and says where, so a
long run's results are not lost (:class:`OutputsKept`).

SIGTERM (``kill``, ``timeout``, a job scheduler) ends a command as Ctrl-C does: the
cleanup runs (no staging directory or temporary file is left behind), and the exit
status is 143 (128 + SIGTERM), as if the signal had killed it.
"""

import contextlib
import errno
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import IO, Any

import click

# What a failed write of the outputs raises without naming a file (PIL writing to an
# open file): a full disk or quota, a file too large, an I/O error.
_WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO})


@dataclass
class Settings:
    """Global options, stored as ``ctx.obj`` by the ``numbabn`` group."""

    verbose: int = 0
    quiet: bool = False


def one_line(text: Any) -> str:
    """``text`` with every run of whitespace (newlines included) as one space."""
    return " ".join(str(text).split())


class CLIError(click.ClickException):
    """A one-line error with exit code 2, for a request this machine cannot serve
    (CUDA without a GPU, torch not installed, an unwritable output, too little
    memory): no usage hint, since the command line itself is well-formed, but the
    same exit code as a usage error."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


class OutputsKept(CLIError):
    """A run finished and wrote its files, but they could not move into ``--out``: they
    are kept in the staging directory, which the message names."""


def check_threads(ctx: click.Context, threads: int) -> None:
    """``--threads`` may not exceed the CPUs this process may use (affinity, cgroup quota)."""
    from numbabn._threads import available_cpus

    cpus = available_cpus()
    if threads > cpus:
        raise click.BadParameter(
            f"{threads} is more than the {cpus} CPUs this process may use", ctx=ctx, param_hint="'--threads'"
        )


class LazyGroup(click.Group):
    """A group whose subcommands live in other modules and are imported on first use.

    ``lazy_subcommands`` maps a command name to ``"module:attribute"``. Adding a
    command is one dict entry, and listing commands in ``--help`` imports only the
    command modules (which import nothing heavy at module level).
    """

    def __init__(self, *args: Any, lazy_subcommands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands if lazy_subcommands is not None else {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_subcommands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy_subcommands.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module, attribute = target.split(":")
        return getattr(import_module(module), attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The command list with each command's whole short help (click would cut it
        at 45 characters with '...')."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, whole_short_help(cmd)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def whole_short_help(cmd: click.Command) -> str:
    """``cmd.short_help``, or the first paragraph of its help, on one line (not cut)."""
    if cmd.short_help:
        return one_line(cmd.short_help)
    return one_line((cmd.help or "").strip().split("\n\n")[0])


def torch_import_error() -> str | None:
    """None when PyTorch imports; else why it cannot be used, as a clause: "PyTorch is
    not installed", or the error its import raised (an install whose import fails: a
    missing shared library, a broken build). Imports torch (seconds): call it only
    where PyTorch is about to be used."""
    from importlib.util import find_spec

    try:
        if find_spec("torch") is None:
            return "PyTorch is not installed"
        import torch  # noqa: F401
    except Exception as exc:  # whatever its import raises: ImportError, OSError, RuntimeError...
        return f"PyTorch is installed but fails to import ({type(exc).__name__}: {one_line(exc)})"
    return None


def _as_one_line(exc: BaseException) -> "CLIError | None":
    """click's usage errors, running out of memory, a bad ``NUMBABN_*`` environment
    variable and Numba's compiler switched off (``NUMBA_DISABLE_JIT=1``) as a one-line
    CLIError; None for anything else."""
    if isinstance(exc, click.exceptions.NoArgsIsHelpError):  # prints the help: leave it alone
        return None
    if isinstance(exc, click.UsageError):
        return CLIError(exc.format_message())
    if isinstance(exc, MemoryError) or _torch_out_of_memory(exc):
        return CLIError(f"out of memory ({type(exc).__name__}: {one_line(exc)}); try smaller inputs")
    if type(exc).__name__ == "SettingError" and type(exc).__module__ == "numbabn.config":
        # a bad NUMBABN_* variable (raised while numbabn.config is imported, which then
        # is not in sys.modules to compare the class with)
        return CLIError(str(exc))
    jit = sys.modules.get("numbabn._jit")  # loaded once a command reaches the kernels
    if jit is not None and isinstance(exc, jit.CompilerDisabledError):  # NUMBA_DISABLE_JIT=1
        return CLIError(str(exc))
    return None


def _torch_out_of_memory(exc: BaseException) -> bool:
    """PyTorch's CPU allocator failing: a RuntimeError ("[enforce fail at alloc_cpu.cpp]
    ... DefaultCPUAllocator: can't allocate memory: you tried to allocate ...")."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "DefaultCPUAllocator" in text)


class RootGroup(LazyGroup):
    """The ``numbabn`` group: its own and every subcommand's usage errors become one
    line (see the module docstring)."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except (click.UsageError, MemoryError) as exc:
            error = _as_one_line(exc)
            if error is None:
                raise
            raise error from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:  # re-raised as it came unless _as_one_line knows it
            error = _as_one_line(exc)
            if error is None:
                raise
            raise error from None

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's main, plus: an output that cannot be written to an open stream (stdout
        on a full disk or over a quota: an OSError that names no file) is one ``Error:``
        line and exit code 2, as the module docstring says of every output; click
        itself handles only a closed pipe (silently)."""
        previous = _exit_on_sigterm()
        # A warning on a command line is its category and message: the source line
        # Python adds would be the console script's `sys.exit(main())`. Only the
        # display changes (-W filters and recorded warnings are as they were).
        formatwarning, warnings.formatwarning = warnings.formatwarning, _warning_line
        try:
            return super().main(*args, **kwargs)
        except OSError as exc:
            if exc.filename is not None or exc.errno not in _WRITE_ERRORS:
                raise
            _silence_stdout()
            CLIError(f"cannot write the output: {exc.strerror or exc}").show()
            sys.exit(CLIError.exit_code)
        finally:
            warnings.formatwarning = formatwarning
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)


def _warning_line(message: Any, category: type[Warning], filename: str, lineno: int, line: Any = None) -> str:
    """``warnings.formatwarning`` for the command line: "Category: message"."""
    return f"{category.__name__}: {message}\n"


def _exit_on_sigterm() -> Any:
    """Make SIGTERM raise SystemExit(143) in the main thread, so that ``finally`` blocks
    (the staging directory's removal, temporary files) run before the process ends;
    returns the handler to put back, or None where nothing was changed (another thread,
    or a handler someone else installed: theirs stays)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL:
        return None

    def terminate(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    return previous


def _silence_stdout() -> None:
    """Flush stdout; if that fails too, point its file descriptor at /dev/null, so that
    the interpreter's last flush at exit does not report the same error again."""
    stream = sys.stdout
    if stream is None:
        return
    try:
        stream.flush()
        return
    except OSError:
        pass
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind it: nothing to flush later either
        pass


# ------------------------------------------------------------------ outputs
def check_output_file(value: str | None, param_hint: str | None) -> str | None:
    """Check before the work that ``value`` (a file path, or '-' for stdout) can be
    written; click.BadParameter (one line, exit 2) if not. Nothing is left behind.
    A path that is this process's stdout (/dev/stdout, /dev/fd/1) is returned as '-':
    written as stdout, whatever it is (a pipe has no directory to write a file into)."""
    if value is None or value == "-":
        return value
    if not value:  # Path("") is the current directory: "'' is a directory" would puzzle
        raise click.BadParameter("an empty path (use '-' for stdout)", param_hint=param_hint)
    if _stdout_as_dash(value) == "-":
        return "-"
    path = Path(value)
    parent = path.parent
    if _dangling(path):  # creating it would fail with "File exists", a puzzle beside a missing file
        raise click.BadParameter(
            f"cannot write {value!r}: it is a dangling symbolic link (its target {os.readlink(path)!r} does not exist)",
            param_hint=param_hint,
        )
    if not parent.exists():
        raise click.BadParameter(f"directory {str(parent)!r} does not exist", param_hint=param_hint)
    if not parent.is_dir():
        raise click.BadParameter(f"{str(parent)!r} is not a directory", param_hint=param_hint)
    if path.is_dir():
        raise click.BadParameter(f"{value!r} is a directory", param_hint=param_hint)
    try:
        if path.exists():
            mode = path.stat().st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
                return value  # opening a pipe for writing could block: accept it
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            try:
                if not stat.S_ISREG(mode):
                    os.write(fd, b"")  # devices: /dev/full refuses even an empty write
            finally:
                os.close(fd)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.close(fd)
            os.unlink(path)
    except OSError as exc:
        raise click.BadParameter(f"cannot write {value!r}: {exc.strerror or exc}", param_hint=param_hint) from None
    return value


def _dangling(path: Path) -> bool:
    """True for a symbolic link whose target does not exist."""
    return path.is_symlink() and not path.exists()


def check_distinct_outputs(outputs: dict[str, str | None]) -> None:
    """Refuse two output options (``{"--json": value, ...}``, values checked by
    :func:`check_output_file`) that name the same file: the later write would replace
    the earlier one silently. Paths compare resolved (symbolic links, ``..``), and
    existing files also by identity (hard links); '-' and /dev/stdout are stdout.
    Devices other than stdout (``/dev/null``) may be named twice: they keep nothing
    to overwrite. click.UsageError."""
    given = [(option, _stdout_as_dash(value)) for option, value in outputs.items() if value is not None]
    for i, (option, value) in enumerate(given):
        for other, earlier in given[:i]:
            if value == earlier == "-":
                raise click.UsageError(f"{other} and {option} cannot both write to stdout ('-')")
            if "-" not in (value, earlier) and _same_file(earlier, value) and not _device(value):
                raise click.UsageError(
                    f"{other} and {option} name the same file ({earlier!r} and {value!r}): "
                    "the second would overwrite the first"
                )


def _stdout_as_dash(value: str) -> str:
    """'-' for a path that is this process's stdout (/dev/stdout, /dev/fd/1), else ``value``."""
    if value != "-" and os.path.realpath(value) in (os.path.realpath("/dev/stdout"), os.path.realpath("/dev/fd/1")):
        return "-"
    return value


def _device(path: str) -> bool:
    """True for an existing file that is not a regular one (a device, a FIFO)."""
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _same_file(a: str, b: str) -> bool:
    """True when the paths ``a`` and ``b`` name one file (or one file to be created)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist yet: only the resolved paths, compared above, could match
        return False


def write_output(value: str, write: Callable[[IO[Any]], Any], what: str, mode: str = "w") -> None:
    """Write an output checked by :func:`check_output_file`: ``write(file)`` fills it.

    '-' is stdout; a regular (or new) file is written to a temporary file in the same
    directory and renamed over the target only when complete; other files (devices)
    are written directly; /dev/stdout and /dev/fd/1 are '-'. Any OSError becomes a
    one-line CLIError."""
    if _stdout_as_dash(value) == "-":
        with click.open_file("-", mode) as f:
            write(f)
        return
    path = Path(os.path.realpath(value))
    try:
        if path.exists() and not path.is_file():
            with open(path, mode) as f:
                write(f)
            return
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, mode) as f:
                write(f)
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise CLIError(f"cannot write {what} to {value!r}: {exc.strerror or exc}") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: set it back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_output_dir(value: str | None, param_hint: str | None) -> Path | None:
    """``--out DIR``: its parent must exist; DIR itself may exist (then it must be a
    writeable directory) or not (then it must be creatable; it is created only when
    the command runs, see :func:`output_dir`). click.BadParameter if not."""
    if value is None:
        return None
    if not value:  # Path("") is the current directory: say so rather than write there unasked
        raise click.BadParameter("an empty path (use '.' for the current directory)", param_hint=param_hint)
    path = Path(value)
    parent = path.parent
    if _dangling(path):  # it would pass the checks below and fail only when the finished run is moved in
        raise click.BadParameter(
            f"{value!r} is a dangling symbolic link (its target {os.readlink(path)!r} does not exist)",
            param_hint=param_hint,
        )
    if path.exists():
        if not path.is_dir():
            raise click.BadParameter(f"{str(path)!r} exists and is not a directory", param_hint=param_hint)
        probe_dir = path
    elif not parent.exists():
        raise click.BadParameter(
            f"directory {str(parent)!r} does not exist (only the last component of --out is created)",
            param_hint=param_hint,
        )
    elif not parent.is_dir():
        raise click.BadParameter(f"{str(parent)!r} is not a directory", param_hint=param_hint)
    else:
        probe_dir = parent
    try:
        tempfile.TemporaryDirectory(dir=probe_dir, prefix=".numbabn-probe-").cleanup()
    except OSError as exc:
        raise click.BadParameter(
            f"cannot write into {str(probe_dir)!r}: {exc.strerror or exc}", param_hint=param_hint
        ) from None
    return path


@contextmanager
def staged_output_dir(path: Path | str) -> Iterator[tuple[Path, Callable[[Any], Any]]]:
    """Yield a fresh temporary directory to write ``path``'s files into; on success move
    them into ``path`` (created now if missing, with the mode ``mkdir`` gives), on
    failure delete them: a command that raises, or whose files cannot all move, leaves
    ``path`` as it was (see :func:`_move_into`); an OSError writing into the stage (a
    full disk) is a one-line CLIError naming the file and the OS error. Yields
    ``(stage, publish)``, where ``publish(value)`` rewrites the strings of ``value``
    that are paths in the stage to paths in ``path``. Files written in full that then
    cannot move into ``path`` stay in the stage: :class:`OutputsKept` names it."""
    path = Path(path)
    existed = path.exists()
    kept = None
    stage = Path(tempfile.mkdtemp(dir=path if existed else path.parent, prefix=f".{path.name}.numbabn-"))

    def publish(value: Any) -> Any:
        if isinstance(value, str):
            # joined, not substituted: "--out /" gives "/x.json", not "//x.json"
            if value == str(stage):
                return str(path)
            if value.startswith(str(stage) + os.sep):
                return str(path / value[len(str(stage)) + 1 :])
            return value
        if isinstance(value, dict):
            return {k: publish(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(publish(v) for v in value)
        return value

    try:
        try:
            yield stage, publish
        except OSError as exc:
            if exc.filename is not None and not _inside(exc.filename, stage):
                raise  # not a write of the outputs (the data being read, say): not an output error
            if exc.filename is None and exc.errno not in _WRITE_ERRORS:
                raise  # a broken pipe, a socket: nothing says it was the outputs' write
            # the file it names, where it was going (a failed write to an open file names none)
            target = path if exc.filename is None else path / os.path.relpath(os.path.abspath(exc.filename), stage)
            raise CLIError(
                f"cannot write {str(target)!r}: {exc.strerror or exc}; {str(path)!r} is left as it was"
            ) from None
        try:
            with _signals_held():
                if existed:
                    _move_into(stage, path)
                else:
                    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp made it 0o700
                    try:
                        os.rename(stage, path)
                    except OSError as exc:
                        raise CLIError(f"cannot create {str(path)!r}: {exc.strerror or exc}") from None
        except CLIError as exc:
            # The run's work is done and written: keep it where it is rather than delete it.
            kept = stage
            where = ", apart from this run's files, kept in" if existed else "; this run's files are kept in"
            raise OutputsKept(f"{exc.message}{where} {str(stage)!r}") from None
    finally:
        if kept is None:
            shutil.rmtree(stage, ignore_errors=True)  # what is left of it: nothing, or the replaced files


@contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGTERM and SIGINT while outputs move into place, and act on them when the
    block ends: an exit in the middle of a move, or of its undo, would leave ``--out``
    half replaced, and the stage's removal would then delete the files it had set
    aside. Held at the Python level (``pthread_sigmask`` holds them for one thread
    only, and numbabn's pool threads would take them). A no-op outside the main
    thread, where Python handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    signals = (signal.SIGTERM, signal.SIGINT)
    previous: dict[int, Any] = {
        sig: signal.signal(sig, lambda signum, frame: pending.append(signum)) for sig in signals
    }
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:  # the first one, as it would have been handled
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), pending[0])


def _inside(name: Any, folder: Path) -> bool:
    """True when the path ``name`` is ``folder`` or in it (a file descriptor is not)."""
    if not isinstance(name, (str, bytes, os.PathLike)):
        return False
    name, top = os.path.abspath(os.fsdecode(name)), os.path.abspath(folder)
    return os.path.commonpath([name, top]) == top


def _move_into(stage: Path, path: Path) -> None:
    """Move the entries of ``stage`` (a directory inside ``path``) into ``path``, all
    or nothing. A directory of ``path`` named like an entry is an error before anything
    moves; files of ``path`` that entries replace are kept in ``stage`` until every move
    succeeded, and if one fails, the moved entries go back and those files return.
    Errors are a one-line CLIError."""
    names = sorted(os.listdir(stage))
    for name in names:
        if (path / name).is_dir() and not (path / name).is_symlink():
            raise CLIError(f"cannot write {str(path / name)!r}: it is a directory; {str(path)!r} is left as it was")
    replaced = Path(tempfile.mkdtemp(dir=stage, prefix=".replaced-"))
    try:
        for name in names:
            if os.path.lexists(path / name):
                os.replace(path / name, replaced / name)
            os.replace(stage / name, path / name)
    except BaseException as exc:
        for moved in names:
            if not os.path.lexists(stage / moved):
                os.replace(path / moved, stage / moved)
        for old in os.listdir(replaced):
            os.replace(replaced / old, path / old)
        with contextlib.suppress(OSError):
            os.rmdir(replaced)  # empty again: the stage holds exactly the run's files
        if isinstance(exc, OSError):
            raise CLIError(
                f"cannot write {str(path / name)!r}: {exc.strerror or exc}; {str(path)!r} is left as it was"
            ) from None
        raise
