"""Errors a user can fix: every command prints them as one line and exits with status 2.

A full disk (or quota) is one of them, wherever it happens (a stage's shard, a Ray worker's write, a training
checkpoint): `DiskFullError` names the file, the space it needs and the space left, and `run_command` turns any
ENOSPC/EDQUOT that reaches it into one, so pipeline and training report it the same way."""

from __future__ import annotations

import errno
import os
import shutil
import sys

from training.quiet import quiet

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# Writers in C++ and Rust (torch's zip writer, safetensors) report the errno only in their message's text.
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28")
LIGHTNING = ("lightning_fabric", "pytorch_lightning", "lightning")


class UserError(ValueError):
    """Bad input or configuration: the message names the bad thing and what was expected."""


class DiskFullError(UserError):
    """A write that found no space: `path` (the final name, never a temporary one), `needed` bytes (an
    estimate, or a lower bound when `at_least`), `free` bytes on its filesystem once the partial file is gone."""

    def __init__(self, path: str, needed: int | None = None, free: int | None = None, quota: bool = False,
                 at_least: bool = False):  # fmt: skip
        self.path, self.needed, self.free, self.quota, self.at_least = str(path), needed, free, quota, at_least
        super().__init__(str(self))

    def __reduce__(self):  # Ray pickles it from a worker to the driver: keep the fields, not the message
        return type(self), (self.path, self.needed, self.free, self.quota, self.at_least)

    def __str__(self) -> str:
        what = "disk quota exceeded" if self.quota else "no space left on device"
        sizes = []
        if self.needed:
            sizes.append(f"needs {'at least ' if self.at_least else '~'}{megabytes(self.needed)}")
        if self.free is not None and not self.quota:  # disk_usage knows nothing of quotas
            sizes.append(f"{megabytes(self.free)} free")
        detail = f" ({', '.join(sizes)})" if sizes else ""
        return f"{what} writing {self.path}{detail}; free space and run the same command again to resume"


def is_disk_full(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS


def disk_full(path: str, err: BaseException | None = None, needed: int | None = None, at_least: bool = False):
    """The DiskFullError for a failed write to `path` (a local path or an fsspec URL): free space is measured
    now, so call it after removing the partial file."""
    quota = getattr(err, "errno", None) == errno.EDQUOT
    return DiskFullError(path, needed or None, free_bytes(path), quota, at_least)


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem holding `path` (or its nearest existing parent); None for object stores."""
    if "://" in str(path) and not str(path).startswith("file://"):
        return None
    folder = os.path.abspath(str(path).removeprefix("file://"))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 50_000 else f"{n / 1e3:.1f} kB"


def run_command(command, cfg):
    """Call `command(cfg)`; a UserError ends the process with its one-line message instead of a traceback.
    Library output goes to a log file first, unless `verbose=true` (training/quiet.py). A command that tracks
    (`tracking=true`) first checks that the MLflow server answers, before any work."""
    quiet(cfg)
    try:
        require_given(cfg)
        from training.command_line import check_override_types

        check_override_types(cfg)
        if cfg.get("tracking") is True:
            from training.tracking import tracking_uri
            from training.tracking.probe import require_tracking

            require_tracking(tracking_uri())
        return command(cfg)
    except Exception as err:
        cause = user_error(err, cfg)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)


def require_given(cfg) -> None:
    """Every `???` of the composed config given: one missed on the command line would otherwise reach a stage
    as the literal path `???` (a crawl, an annotate, a filter wrote a folder of that name) or end in OmegaConf's
    traceback at its first use."""
    from omegaconf import DictConfig

    if not isinstance(cfg, DictConfig):
        return
    missing = list(missing_keys(cfg))
    if missing:
        example = " ".join(f"{key}=…" for key in missing)
        raise UserError(f"{', '.join(missing)}: required, not given; add {example} to the command")


def missing_keys(node, prefix: str = ""):
    """The full keys of `node`'s `???` values, without resolving an interpolation (OmegaConf.missing_keys does,
    and fails on `${output}/raw` while `output` is the missing one: that key itself is reported)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    for key in node.keys() if isinstance(node, DictConfig) else range(len(node)):
        if OmegaConf.is_missing(node, key):
            yield f"{prefix}{key}"
        elif not OmegaConf.is_interpolation(node, key):
            child = node[key]
            if isinstance(child, (DictConfig, ListConfig)):
                yield from missing_keys(child, f"{prefix}{key}.")


def user_error(err: BaseException | None, cfg=None) -> UserError | None:
    """The UserError behind `err`, also when Hydra's instantiate wrapped it (it re-raises with a cause) or Ray
    carried it from a worker (`RayTaskError(X)` is an X, with the worker's own exception as its `cause`). A
    full disk that no writer of ours named becomes a DiskFullError for the file it names, else the output.
    The whole chain is searched for a UserError first: a wrapper's text may quote a full disk that a
    DiskFullError further down already names with its file and size."""
    chain = _exception_chain(err)
    for link in chain:
        if isinstance(link, UserError):
            return link
    for link in chain:
        if is_disk_full(link) or any(text in str(link) for text in DISK_FULL_TEXTS):
            fallback = (cfg.get("output") if cfg is not None and hasattr(cfg, "get") else None) or os.getcwd()
            return disk_full(getattr(link, "filename", None) or fallback, link)
    for link in chain:
        # Lightning's own verdict on a setting (trainer.max_steps=-5, a strategy the machine lacks): its message
        # names the setting; Hydra's instantiate would otherwise bury it in a traceback.
        if type(link).__name__ == "MisconfigurationException" and type(link).__module__.startswith(LIGHTNING):
            return UserError(f"trainer: {link}")
    for link in chain:
        # A `${…}` that does not resolve (`${oc.env:UNSET}` on the command line, a key that is not there)
        if type(link).__name__ in ("InterpolationResolutionError", "InterpolationKeyError"):
            reason = str(link).splitlines()[0] if str(link) else type(link).__name__
            where = getattr(link, "full_key", None)
            return UserError(f"{where}: {reason}" if where else f"a ${{…}} in the config does not resolve: {reason}")
    for link in chain:
        if type(link).__name__ == "InstantiationException" and type(link).__module__.startswith("hydra"):
            from training.command_line import instantiation_verdict

            verdict = instantiation_verdict(link)
            return UserError(verdict) if verdict else None
    return None


def _exception_chain(err: BaseException | None) -> list[BaseException]:
    """`err`, then what it was raised from, outermost first. Ray's `cause` (the worker's exception as it was
    raised, fields and all) comes just before the RayTaskError that carries it, when it is a UserError or a
    full disk."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        original = getattr(err, "cause", None)  # Ray's: the exception as the worker raised it
        if isinstance(original, BaseException) and type(original) is not type(err):
            if isinstance(original, UserError) or is_disk_full(original):
                chain.append(original)
        chain.append(err)
        err = err.__cause__ or err.__context__
    return chain
