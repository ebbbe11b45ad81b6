"""The command line's own mistakes, as one line and exit 2 like every other bad input (training/errors.py).

Hydra reports a command line it cannot compose (a key the config lacks, a config group option that does not
exist, an override it cannot parse) in several lines and exits 1; `hydra_entry` turns those into one line
naming the override, with what Hydra offers instead. A value of the wrong type (`module.optimizer.lr=abc`)
composes fine, since our configs are plain YAML, and would only fail deep in the library that reads it (an
optimizer's TypeError, a dataclass validation): `override_type_errors` compares every override the user typed
with the value the config has without it, and refuses a word where a number or a boolean is expected.
A user's own `HYDRA_FULL_ERROR=1` keeps Hydra's full tracebacks, as Hydra documents.
"""

from __future__ import annotations

import os
import re
import sys

from training.errors import UserError

# The user's own wish for tracebacks: HYDRA_FULL_ERROR=1 set by them, not by `hydra_entry` in a parent process
# (a DDP rank or a Ray worker inherits the parent's environment, marker included).
OURS = "PIXELMILL_SET_HYDRA_FULL_ERROR"
USER_WANTS_TRACEBACKS = os.environ.get("HYDRA_FULL_ERROR") == "1" and OURS not in os.environ


# Settings whose number a word may stand for: Lightning's model-parallel sizes take "auto". `trainer.devices`
# also takes device lists ("0,1") and Lightning checks it itself (its MisconfigurationException is one line too).
ACCEPTED_WORDS = {"data_parallel_size": ("auto",), "tensor_parallel_size": ("auto",)}
CHECKED_BY_THEIR_LIBRARY = ("trainer.devices",)


def hydra_entry(main) -> None:
    """Run a `@hydra.main` function; Hydra's verdicts on the command line become one line and exit 2."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    if USER_WANTS_TRACEBACKS:
        main()
        return
    os.environ.update({"HYDRA_FULL_ERROR": "1", OURS: "1"})  # Hydra raises its verdict instead of printing it
    try:
        main()
    except (ConfigCompositionException, OverrideParseException) as err:
        print(f"error: {hydra_verdict(err)}", file=sys.stderr)
        sys.exit(2)


def hydra_verdict(err: Exception) -> str:
    """One line from Hydra's message: the unknown option with the choices it lists, or its first lines."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(err, MissingConfigException) and err.missing_cfg_file and "/" in err.missing_cfg_file:
        group, option = err.missing_cfg_file.rsplit("/", 1)
        choices = ", ".join(sorted(err.options or [])) or "none"
        return f"{group}={option}: no such option in conf/{group}/ (there: {choices})"
    if isinstance(err, OverrideParseException):
        return f"{err.override}: not an override Hydra can read ({_one_line(err.message)})"
    unknown = re.match(r"Could not override '([^']+)'\.\s+To append to your config use (\S+)", str(err))
    if unknown:
        return f"{unknown[1]}: no such key in the config (to add a new one: {unknown[2]})"
    cause = f": {_one_line(str(err.__cause__))}" if err.__cause__ is not None else ""
    return _one_line(str(err)) + cause


def instantiation_verdict(err: Exception) -> str | None:
    """One line for Hydra's InstantiationException, raised when a config's `_target_` cannot be found or
    refuses its arguments (`model.vision.num_attention_heads=3` for a hidden size of 64): the config key, the
    target, and the innermost reason. None when the user asked for tracebacks (HYDRA_FULL_ERROR=1)."""
    if USER_WANTS_TRACEBACKS:
        return None
    text = str(err)
    key = re.search(r"full_key: (\S+)", text)
    target = re.search(r"target '([^']+)'", text)
    cause = err.__cause__
    while cause is not None and cause.__cause__ is not None:
        cause = cause.__cause__
    reason = [line.strip() for line in str(cause).splitlines() if line.strip()] if cause is not None else []
    where = ": ".join(part for part in (key and key[1], target and target[1]) if part)
    return f"{where}: {reason[-1] if reason else _one_line(text)}"


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return "; ".join(line for line in lines if not line.startswith(("full_key:", "object_type=")))


def check_override_types(cfg) -> None:
    """A UserError for the first override that gives a word where the config has a number or a boolean."""
    errors = list(override_type_errors(cfg))
    if errors:
        raise UserError(errors[0])


def override_type_errors(cfg):
    """'key=value: expected …' for each typed override whose value is a string where the config, composed
    without that override, holds an int, a float or a bool. Only where Hydra composed `cfg` for this process
    (not in a Ray worker or a test's own composition); group choices (`filter=basic`) are not values and pass."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    if not HydraConfig.initialized():
        return
    given = OmegaConf.to_container(HydraConfig.get().overrides.task, resolve=False)  # as typed, ${…} unresolved
    suspects = {}
    for text, override in zip(given, OverridesParser.create().parse_overrides(given)):
        if override.is_delete() or override.is_sweep_override():
            continue
        key = override.key_or_group
        try:
            value = override.value()
        except Exception as err:  # an interpolation that does not resolve (${oc.env:UNSET}): the user's to fix
            raise UserError(f"{text}: {_one_line(str(err))}") from err
        if key in CHECKED_BY_THEIR_LIBRARY or value in ACCEPTED_WORDS.get(key.rsplit(".", 1)[-1], ()):
            continue
        current = OmegaConf.select(cfg, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        if isinstance(value, str) and current == value:
            suspects[text] = (key, value)
    if not suspects:
        return
    base = _compose_without(HydraConfig.get().job.config_name, [text for text in given if text not in suspects])
    if base is None:
        return
    for key, value in suspects.values():
        default = OmegaConf.select(base, key, default=None, throw_on_missing=False, throw_on_resolution_failure=False)
        shown = repr(value) if _is_number(value) else value  # a quoted number ('500') is a string: say so
        if isinstance(default, bool):
            yield f"{key}={shown}: expected true or false"
        elif isinstance(default, (int, float)):
            kind = "a whole number" if isinstance(default, int) else "a number"
            yield f"{key}={shown}: expected {kind} (the config's value: {default})"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _compose_without(config_name: str, overrides: list[str]):
    """The config as composed from `overrides`, or None where Hydra cannot compose it again here."""
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return None
    try:
        return compose(config_name=config_name, overrides=overrides)
    except Exception:  # a check, not a gate: whatever Hydra refuses here it refused (or not) on the real run
        return None
