"""What a user reads: each command's own progress and summary on stdout, its one-line error on stderr, and the
chatter of the libraries under it (Lightning, MLflow, transformers, diffusers, Ray, Python warnings) in a log
file: `<output>/pixelmill.log`, or the Hydra run folder's where `output` is a stage's data (or a file, or remote).
`verbose=true` leaves everything on the console, as the libraries set it.

`quiet(cfg)` runs first in `run_command`, so in every command and pipeline stage. Libraries set up their loggers
when imported or started (MLflow and Lightning at import, Ray at `ray.init`), mostly after us; so a library's
logger is one that keeps our routing whatever the library sets (`_Logger`), and what the library set comes back
with `verbose`. Their errors still reach stderr. Child processes (Ray workers, DDP ranks) get environment
variables the libraries read at import."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import re
import sys
import threading
from contextlib import contextmanager

LOG_NAME = "pixelmill.log"
OURS = ("pipeline", "training", "evaluation", "bench", "__main__", "hydra")  # shown as today (hydra: multirun lines)
LIBRARIES = (
    "lightning", "pytorch_lightning", "lightning_fabric", "mlflow", "alembic", "sqlalchemy", "huey",
    "transformers", "diffusers", "huggingface_hub", "accelerate", "ray", "torch", "urllib3", "filelock",
    "fsspec", "httpx", "httpcore", "PIL", "matplotlib", "py.warnings",
)  # fmt: skip
ENVIRONMENT = {  # read at import, so they reach Ray workers and DDP ranks too; a user's own setting wins
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars
}


class _Route:
    on = False
    handlers: list[logging.Handler] = []
    log_file: _LogFile | None = None


def is_quiet() -> bool:
    """Whether this process routes library output to the log file (not `verbose`)."""
    return _Route.on


def log_file() -> str | None:
    return _Route.log_file.baseFilename if _Route.on and _Route.log_file else None


def quiet(cfg) -> None:
    """Route library output to the log file unless `cfg.verbose`; never fails the command it starts."""
    try:
        verbose = bool(cfg.get("verbose", False))
    except Exception:
        verbose = False
    if verbose:
        _Route.on = False  # the libraries' own handlers, kept aside, are theirs again
        return
    try:
        _route(_log_path(cfg))
    except Exception:  # the log is a convenience: a command runs without it
        pass


def _log_path(cfg) -> str:
    try:
        output = cfg.get("output")
    except Exception:  # ???, or an interpolation that fails: the command will say so
        output = None
    if output and "://" not in str(output) and not os.path.splitext(str(output))[1] and not _stage_data(cfg):
        return os.path.abspath(os.path.join(str(output), LOG_NAME))
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            return os.path.join(HydraConfig.get().runtime.output_dir, LOG_NAME)
    except Exception:
        pass
    return os.path.abspath(LOG_NAME)


def _stage_data(cfg) -> bool:
    """A pipeline stage's `output` is its data, claimed empty (pipeline/storage.py): no log file there.
    pipeline.run's `output` holds the stages' folders (it has a `crawl` section)."""
    return ("input" in cfg or "source" in cfg) and "crawl" not in cfg


def _route(path: str) -> None:
    if _Route.log_file is None:
        _Route.log_file = _LogFile(path)
        _Route.log_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        errors = logging.StreamHandler(sys.stderr)
        errors.setLevel(logging.ERROR)
        errors.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        _Route.handlers = [_Route.log_file, errors]
    elif _Route.log_file.baseFilename != path:  # another command in this process (tests): its own file
        _Route.log_file.close()
        _Route.log_file.baseFilename = path
    for name, key in ENVIRONMENT.items():
        os.environ.setdefault(name, key)
    _Route.on = True

    logging.captureWarnings(True)  # warnings → the "py.warnings" logger, one of LIBRARIES
    logging.setLoggerClass(_Logger)  # library loggers made from now on
    for name, logger in list(logging.Logger.manager.loggerDict.items()):  # and those already made
        if isinstance(logger, logging.Logger) and type(logger) is logging.Logger and _library(name):
            logger.__class__ = _Logger
    root = logging.getLogger()
    for handler in root.handlers:  # Hydra's console: our own records, errors; the rest goes to the file
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            if not any(isinstance(f, _ConsoleFilter) for f in handler.filters):
                handler.addFilter(_ConsoleFilter())
    if not any(isinstance(f, _OthersFilter) for f in _Route.log_file.filters):
        _Route.log_file.addFilter(_OthersFilter())
    if _Route.log_file not in root.handlers:
        root.addHandler(_Route.log_file)

    _after_import("transformers.utils.logging", _hf_logging)
    _after_import("diffusers.utils.logging", _hf_logging)
    _after_import("huggingface_hub.utils", lambda module: module.disable_progress_bars())


def _library(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in LIBRARIES)


def _ours(name: str) -> bool:
    return name == "root" or any(name == own or name.startswith(own + ".") for own in OURS)


class _ConsoleFilter(logging.Filter):
    def filter(self, record):
        return not _Route.on or record.levelno >= logging.ERROR or _ours(record.name)


class _OthersFilter(logging.Filter):
    """On the root logger the file takes what no library logger routed: records of packages not in LIBRARIES."""

    def filter(self, record):
        return not _ours(record.name)


class _LogFile(logging.FileHandler):
    """Opened at the first record, its folder made then; a file it cannot write loses the record, quietly."""

    def __init__(self, path: str):
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):
        try:
            os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
            return super()._open()
        except OSError:  # FileHandler.emit opens outside its own error handling: no stream, no record
            return None

    def handleError(self, record):
        pass


class _Logger(logging.Logger):
    """A logger that, for a library while quiet, has our handlers and does not propagate; what the library
    sets (handlers, propagate) is kept and is its own again when not quiet. Other loggers: plain loggers."""

    def _routed(self) -> bool:
        return _Route.on and _library(self.name)

    @property
    def handlers(self):
        return list(_Route.handlers) if self._routed() else self.__dict__.setdefault("handlers", [])

    @handlers.setter
    def handlers(self, value):
        self.__dict__["handlers"] = value

    @property
    def propagate(self):
        return False if self._routed() else self.__dict__.get("propagate", True)

    @propagate.setter
    def propagate(self, value):
        self.__dict__["propagate"] = value

    def addHandler(self, hdlr):
        own = self.__dict__.setdefault("handlers", [])
        if hdlr not in own:
            own.append(hdlr)

    def removeHandler(self, hdlr):
        own = self.__dict__.setdefault("handlers", [])
        if hdlr in own:
            own.remove(hdlr)


def _hf_logging(module) -> None:
    """transformers' or diffusers' logging utils: no progress bars; warnings (to the file) but no info."""
    module.disable_progress_bar()
    module.set_verbosity_warning()


def _after_import(name: str, configure) -> None:
    """Call `configure(module)` now if `name` is imported, else right after its import: importing transformers
    or diffusers only to configure them would cost every command seconds."""
    module = sys.modules.get(name)
    if module is not None:
        try:
            configure(module)
        except Exception:
            pass
        return
    if not any(isinstance(f, _AfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())
    _AfterImport.hooks[name] = configure


class _AfterImport(importlib.abc.MetaPathFinder):
    hooks: dict = {}

    def find_spec(self, fullname, path, target=None):
        configure = self.hooks.pop(fullname, None)
        if configure is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_configure(module):
            exec_module(module)
            if _Route.on:
                try:
                    configure(module)
                except Exception:
                    pass

        spec.loader.exec_module = exec_then_configure
        return spec


class _Native:
    routed: set[bytes] = set()  # patterns already routed in this process


@contextmanager
def native_lines_to_log(*patterns: bytes):
    """While open, lines that native code writes straight to file descriptor 2 (Ray's C++ core worker logs
    there, past every Python logger) go to the log file when they hold one of `patterns` (literal bytes);
    everything else on descriptor 2 passes through as it comes, progress bars' carriage returns included. A no-op
    unless quiet.

    Each pattern is a line Ray prints once per process: once every pattern has been routed, descriptor 2 is the
    console again at once, and later calls do nothing. So the detour lasts from an actor pool's start to its
    first actor, and a crash after that cannot leave its last words in the pipe. Descriptor 2 goes through a pipe
    read by a thread; a C++ log line is one write under the pipe's atomic size, so it arrives whole in one read."""
    patterns = tuple(p for p in patterns if p not in _Native.routed)
    if not _Route.on or _Route.log_file is None or not patterns:
        yield
        return
    # From the native line's own prefix ("[2026-12-07 15:37:50,627 E 8659 8659] ", after Ray's "(Worker pid=12) "
    # when a worker's line is forwarded): a progress bar written before it, with no newline, stays on the console.
    noise_line = re.compile(
        rb"(?:\([^()\n]*pid=\d+[^()\n]*\) )?\[\d{4}-\d\d-\d\d [\d:,.]+ [A-Z] \d+ \d+\] [^\n]*(?:"
        + b"|".join(re.escape(p) for p in patterns)
        + rb")[^\n]*\n?"
    )
    try:
        sys.stderr.flush()
        console = os.dup(2)
        read_end, write_end = os.pipe()
    except OSError:  # no descriptors left, or no stderr: the command runs without the detour
        yield
        return
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward():  # never stops reading before the pipe's end: a full pipe would block every write to stderr
        while chunk := os.read(read_end, 1 << 16):
            try:
                hits = noise_line.findall(chunk)
                for hit in hits:
                    # a warning: the log file only (our console handler takes errors, which would come back here)
                    logging.getLogger("ray.native").warning(hit.decode(errors="replace").strip())
                    _Native.routed.update(p for p in patterns if p in hit)
                if hits and _Native.routed.issuperset(patterns):
                    os.dup2(console, 2)  # the console again; what is still in the pipe follows below
                passing = memoryview(noise_line.sub(b"", chunk))
            except Exception:  # whatever failed, the bytes still reach the console
                passing = memoryview(chunk)
            try:
                while passing:
                    passing = passing[os.write(console, passing) :]
            except OSError:  # the console went away: what is left is dropped, as it would have been
                pass
        os.close(read_end)

    thread = threading.Thread(target=forward, name="native-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # closes the pipe's last write end here (if the thread has not): it drains and ends
        thread.join(timeout=2)
        if not thread.is_alive():  # else a child inherited the pipe and keeps it open: the thread still needs it
            os.close(console)
