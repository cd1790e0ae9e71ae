"""Command-line plumbing every tool shares: common flags, config precedence, the main() wrapper.

A tool's cli.py defines `get_parser()` (built with `make_parser`) and a handler
`run(args, ctx) -> manifest | (manifest, exit_code) | None`, then `main = entry(TOOL, get_parser, run)`.
The wrapper turns every exception into a one-line message on stderr, the error envelope on
stdout (when stdout is not a TTY), and the catalogued exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import traceback
from pathlib import Path
from typing import Callable

from . import __version__
from .errors import BpError, UpstreamFailure, from_os_error
from .envvars import ENV_VARS
from .progress import Reporter
from .redact import redact


class Terminated(BaseException):
    """Raised in the main thread on SIGTERM (a BaseException, so `except Exception` can't eat it)."""


class BpArgumentParser(argparse.ArgumentParser):
    """argparse that raises INPUT_USAGE instead of printing and exiting, so pipes get an envelope."""

    # The subcommand assumed when the first word is none of them (`bp-eval MODEL` = `bp-eval run MODEL`).
    default_command: str | None = None

    def error(self, message):  # noqa: D401 - argparse API
        raise BpError("INPUT_USAGE", f"{self.prog}: {message}", hint=f"run '{self.prog} --help'")

    def parse_known_args(self, args=None, namespace=None):
        if self.default_command is not None:
            args = self._with_default_command(list(sys.argv[1:] if args is None else args))
        return super().parse_known_args(args, namespace)

    def _with_default_command(self, args: list[str]) -> list[str]:
        """Prepend default_command unless the first positional word already names a subcommand.

        The subcommand takes the common flags too, so putting it first is always safe; a bare
        --help or --version (no positional word) stays with the top-level parser.
        """
        commands = set()
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                commands |= set(action.choices)
        i = 0
        while i < len(args):
            tok = args[i]
            if tok == "--" or tok == "-" or not tok.startswith("-"):
                return args if tok in commands else [self.default_command] + args
            if tok in ("-h", "--help", "--version"):
                return args
            action = self._option_string_actions.get(tok.split("=", 1)[0])
            takes_value = action is not None and action.nargs != 0 and "=" not in tok
            i += 2 if takes_value else 1
        return [self.default_command] + args


def number(kind: type = int, *, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, auto: bool = False) -> Callable[[str], object]:
    """An argparse type for a finite int or float within bounds, or the word `auto` when auto=True.

    number(int, low=1) is a positive integer; number(float, low=0, high=1, high_open=True) is [0, 1).
    """
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        if auto and str(text).strip().lower() == "auto":
            return "auto"
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}{' or auto' if auto else ''}: {text!r}") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        too_low = low is not None and (v < low or (low_open and v == low))
        too_high = high is not None and (v > high or (high_open and v == high))
        if too_low or too_high:
            if low is not None and high is not None:
                rule = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                rule = f"{'>' if low_open else '>='} {low:g}"
            else:
                rule = f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return v
    parse.__name__ = f"{kind.__name__}{'_or_auto' if auto else ''}"  # argparse names the type in errors
    return parse


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's line breaks (examples in epilogs)."""


class _VersionAction(argparse.Action):
    def __init__(self, option_strings, dest, tool: str = "", **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.tool = tool

    def __call__(self, parser, namespace, values, option_string=None):
        verbose = any(a in ("-v", "--verbose") for a in sys.argv[1:])
        sys.stdout.write(version_text(self.tool, verbose) + "\n")
        sys.stdout.flush()
        raise SystemExit(0)


def version_text(tool: str, verbose: bool = False) -> str:
    """`bp-x 0.1.0`; with --verbose, the versions a bug report needs (no heavy imports)."""
    if not verbose:
        return f"{tool} {__version__}"
    from importlib import metadata
    lines = [f"{tool} {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"platform {platform.platform()}"]
    for pkg in ("torch", "transformers", "peft", "trl", "accelerate", "bitsandbytes", "gguf",
                "huggingface-hub", "llama-cpp-python", "datasets"):
        try:
            lines.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{pkg} not installed")
    return "\n".join(lines)


def make_parser(tool: str, description: str, epilog: str | None = None) -> BpArgumentParser:
    """A parser with the common flags every bp-* tool takes."""
    parser = BpArgumentParser(prog=tool, description=description, epilog=epilog,
                              formatter_class=_HelpFormatter)
    add_common_args(parser, tool)
    return parser


def add_common_args(parser: argparse.ArgumentParser, tool: str) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--version", action=_VersionAction, tool=tool,
                   help="print the version and exit (with --verbose: library versions for bug reports)")
    g.add_argument("-v", "--verbose", action="store_true", default=False,
                   help="debug logging, and a full traceback on internal errors")
    g.add_argument("--quiet", action="store_true", default=False,
                   help="only warnings and errors on stderr")
    g.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="stderr format: human text, or one JSON object per event "
                        "(env BACKPROPAGATE_LOG_FORMAT)")
    g.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="lowest level logged (env BACKPROPAGATE_LOG_LEVEL)")
    g.add_argument("--config", metavar="FILE", default=None,
                   help="JSON or YAML file of defaults; keys are long flag names with _ (flags and "
                        "environment win over it)")


def add_subparsers(parser: argparse.ArgumentParser, tool: str, default: str | None = None, **kw):
    """Subcommands that also accept the common flags after the verb.

    default: the subcommand to run when the first word names none (e.g. `bp-eval MODEL`).
    """
    sub = parser.add_subparsers(dest="command", parser_class=BpArgumentParser, **kw)
    if default is not None:
        parser.default_command = default
    orig = sub.add_parser

    def add_parser(name, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        p = orig(name, **kwargs)
        p.prog = f"{tool} {name}"
        add_common_args(p, tool)
        return p

    sub.add_parser = add_parser
    return sub


# -- parsing with precedence: flags > environment > --config > defaults ------------------------

def _walk_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _walk_parsers(sub)


def _coerce(action: argparse.Action, value, origin: str):
    if isinstance(value, str) and action.type is not None and callable(action.type):
        try:
            value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise BpError("CONFIG_INVALID", f"{origin}: invalid value {value!r} for {action.dest}: {exc}") from None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) and isinstance(value, str):
        low = value.strip().lower()
        if low not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise BpError("CONFIG_INVALID", f"{origin}: {action.dest} must be true or false, got {value!r}")
        value = low in ("1", "true", "yes", "on")
    if action.choices is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item not in action.choices:
                raise BpError("CONFIG_INVALID", f"{origin}: {action.dest} must be one of "
                              f"{', '.join(map(str, action.choices))}, got {item!r}")
    return value


def load_config_file(path: str) -> dict:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BpError("INPUT_NOT_FOUND", f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BpError("CONFIG_INVALID", f"cannot read config file {path}: {exc}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise different types
        raise BpError("CONFIG_INVALID", f"config file {path} is not valid {p.suffix.lstrip('.') or 'JSON'}: "
                      f"{str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BpError("CONFIG_INVALID", f"config file {path} must hold a mapping of flag names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse argv, with defaults taken from --config and then the environment."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    parsers = list(_walk_parsers(parser))
    defaults: dict[str, tuple[object, str]] = {}
    if known.config:
        for key, value in load_config_file(known.config).items():
            defaults[key] = (value, f"config {known.config}")
    for var in ENV_VARS:
        if var.dest and os.environ.get(var.name):
            defaults[var.dest] = (os.environ[var.name], f"environment {var.name}")
    if defaults:
        seen = set()
        for p in parsers:
            for action in p._actions:
                if action.dest in defaults and action.dest not in ("help", "version", "config"):
                    value, origin = defaults[action.dest]
                    p.set_defaults(**{action.dest: _coerce(action, value, origin)})
                    seen.add(action.dest)
        unknown = [k for k, (_, origin) in defaults.items() if k not in seen and origin.startswith("config")]
        if unknown:
            raise BpError("CONFIG_INVALID", f"config {known.config}: unknown keys: {', '.join(sorted(unknown))}",
                          hint="keys are long flag names with _ instead of -, as in --help")
    return parser.parse_args(argv)


# -- the main() wrapper -----------------------------------------------------------------------

class Context:
    """What a handler gets besides args: the tool name and its reporter."""

    def __init__(self, tool: str, args: argparse.Namespace, reporter: Reporter):
        self.tool = tool
        self.args = args
        self.r = reporter
        self.summary_lines: list[str] = []

    def summary(self, line: str) -> None:
        """A line for the human summary printed on stderr when it is a TTY."""
        self.summary_lines.append(line)


def reporter_from_args(tool: str, args: argparse.Namespace, **kw) -> Reporter:
    level = "debug" if getattr(args, "verbose", False) else getattr(args, "log_level", "info")
    return Reporter(tool, log_format=getattr(args, "log_format", "text"), level=level,
                    quiet=getattr(args, "quiet", False), events_file=getattr(args, "events", None), **kw)


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _write_envelope(envelope: dict) -> None:
    if _stdout_is_tty():
        return
    from .manifest import dumps
    try:
        sys.stdout.write(dumps(envelope).decode() + "\n")
        sys.stdout.flush()
    except (BrokenPipeError, OSError):
        pass


def _stderr(line: str) -> None:
    """Write a line on stderr, redacted: --verbose tracebacks carry exception messages and source lines."""
    try:
        sys.stderr.write(redact(line) + "\n")
        sys.stderr.flush()
    except (BrokenPipeError, OSError):
        pass


def _on_sigterm(signum, frame):
    raise Terminated()


def run_main(tool: str, get_parser: Callable[[], argparse.ArgumentParser],
             handler: Callable, argv: list[str] | None = None) -> int:
    """Run a tool's handler and return the process exit code (never raises)."""
    from . import manifest as _manifest
    from .manifest import emit
    raw = list(sys.argv[1:] if argv is None else argv)
    _manifest.CURRENT_COMMAND = [tool] + raw
    verbose = "-v" in raw or "--verbose" in raw
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (tests calling main in a thread)
        pass
    ctx = None
    try:
        try:
            args = parse_args(get_parser(), raw)
            verbose = verbose or bool(getattr(args, "verbose", False))
            ctx = Context(tool, args, reporter_from_args(tool, args))
            result = handler(args, ctx)
        except KeyboardInterrupt:
            raise BpError("RUNTIME_INTERRUPTED", "interrupted") from None
        except Terminated:
            raise BpError("RUNTIME_TERMINATED", "terminated by SIGTERM") from None
        except MemoryError:
            raise BpError("RUNTIME_OOM", "out of memory (host RAM)") from None
        except OSError as exc:
            if isinstance(exc, BrokenPipeError):
                raise
            raise from_os_error(exc, tool) from exc
        code = 0
        if isinstance(result, tuple):
            result, code = result
        if result is not None:
            emit(result)
            if ctx is not None and not ctx.args.quiet and sys.stderr.isatty():
                for line in ctx.summary_lines or [_default_summary(result)]:
                    _stderr(line)
        return code
    except UpstreamFailure as up:
        env = up.envelope
        _stderr(f"error[{env.get('code', '?')}]: {env.get('message', '')} (from {env.get('tool', 'upstream')})")
        _write_envelope(env)
        return up.exit_code
    except BpError as err:
        _stderr(err.line())
        if verbose and err.__cause__ is not None:
            _stderr("".join(traceback.format_exception(err.__cause__)).rstrip())
        _write_envelope(err.envelope(tool))
        return err.exit_code
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): not our failure to report.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 141
    except SystemExit as exc:  # --help / --version
        return exc.code if isinstance(exc.code, int) else 0
    except Exception as exc:  # a bug: one line, never a bare traceback unless asked
        err = BpError("RUNTIME_INTERNAL", f"internal error: {type(exc).__name__}: {exc}".splitlines()[0],
                      hint="run again with --verbose and report it (docs/bug-reporting.md)")
        if verbose:
            _stderr("".join(traceback.format_exception(exc)).rstrip())
        _stderr(err.line())
        _write_envelope(err.envelope(tool))
        return err.exit_code
    finally:
        if ctx is not None:
            ctx.r.close()
        if previous is not None:
            try:
                signal.signal(signal.SIGTERM, previous)
            except ValueError:
                pass


def _default_summary(result: dict) -> str:
    kind = result.get("kind", "result")
    root = result.get("root")
    return f"{kind} ok" + (f": {root}" if root else "")


def entry(tool: str, get_parser: Callable[[], argparse.ArgumentParser], handler: Callable):
    """Make the console-script `main()` for a tool."""
    def main(argv: list[str] | None = None) -> None:
        sys.exit(run_main(tool, get_parser, handler, argv))
    main.__doc__ = f"Entry point of {tool}."
    return main
