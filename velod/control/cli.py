"""velodctl: the command-line client of velod's control socket.

Exit codes: 0 only when the daemon answered success; 1 the daemon answered with an error
(or a reply velodctl cannot take); 2 usage; 3 the daemon could not be reached or dropped
the connection; 130 interrupted. With --json an error is also printed as JSON on stdout.
Capabilities add commands in their own ``cli`` modules (``register(sub)``), named in
``velod.capabilities``; only the module of the command being run is imported. The commands
scripts call most often (``status``, ``ping``) bypass argparse entirely, which costs more
than the round trip.
"""

import sys
import time
from types import SimpleNamespace  # already loaded by the interpreter: free

from velod import __version__, paths
from velod.control.client import Client, DaemonUnreachable, RemoteError, ReplyTooLarge
from velod.control.output import ago, human_duration, print_json, print_json_line, table

TYPE_CHECKING = False  # like typing.TYPE_CHECKING, without importing typing
if TYPE_CHECKING:
    import argparse
    from typing import Any

EXIT_OK, EXIT_REMOTE, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141  # as a shell reports SIGINT and SIGPIPE

LOCAL_COMMANDS = {"config"}  # commands that can work without the daemon


def _global_options(argv: list[str]) -> tuple[list[str], bool, str | None]:
    """Pull --json and --socket out of argv wherever they appear."""
    rest, as_json, sock = [], False, None
    it = iter(argv)
    for arg in it:
        if arg == "--json":
            as_json = True
        elif arg == "--socket":
            sock = next(it, None)
            if sock is None:
                raise SystemExit("velodctl: --socket needs a path")
        elif arg.startswith("--socket="):
            sock = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return rest, as_json, sock


def build_parser(command: str | None) -> "argparse.ArgumentParser":
    import argparse

    parser = argparse.ArgumentParser(
        prog="velodctl", description="Control velod. Global options anywhere: --json "
        "(machine-readable output), --socket PATH (default: "
        f"{paths.default_socket()}).")
    parser.add_argument("--version", action="version", version=f"velodctl {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    sub.add_parser("status", help="daemon status").set_defaults(func=cmd_status)
    sub.add_parser("ping", help="check that velod answers").set_defaults(func=cmd_ping)
    sub.add_parser("reload", help="reload the config; returns once applied or refused"
                   ).set_defaults(func=cmd_reload)
    watch = sub.add_parser("watch", help="print events as they happen (Ctrl-C to stop)")
    watch.add_argument("topics", nargs="*", default=["*"],
                       help="topics such as 'hardware.*' (default: all)")
    watch.set_defaults(func=cmd_watch)
    config = sub.add_parser("config", help="show or validate the config")
    config_sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    config_sub.required = True
    config_sub.add_parser("show", help="the running config").set_defaults(func=cmd_config_show)
    validate = config_sub.add_parser("validate", help="validate a config file")
    validate.add_argument("file")
    validate.set_defaults(func=cmd_config_validate, local=True)

    from velod.capabilities import cli_modules  # not on the status/ping fast path

    plugins = cli_modules()  # command name -> module providing it through register(sub)
    modules = ([plugins[command]] if command in plugins
               else [] if command in {"status", "ping", "reload", "watch", "config"}
               else list(dict.fromkeys(plugins.values())))
    import importlib

    for name in modules:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, as_json, sock = _global_options(argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    fast = FAST_COMMANDS.get(tuple(argv))
    if fast is not None:
        args: Any = SimpleNamespace(func=fast)  # what argparse would give
    else:
        args = build_parser(command).parse_args(argv)
    args.json = as_json
    args.socket = sock or paths.default_socket()
    try:
        if getattr(args, "local", False):
            return args.func(args, None)
        with Client.connect(args.socket) as client:
            return args.func(args, client)
    except DaemonUnreachable as exc:
        return fail(args, EXIT_UNREACHABLE, exc.code, str(exc))
    except RemoteError as exc:
        return fail(args, EXIT_REMOTE, exc.code, f"error: {exc.message} [{exc.code}]",
                    exc.data)
    except ReplyTooLarge as exc:
        return fail(args, EXIT_REMOTE, "reply_too_large", str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Our stdout was closed by its reader (`velodctl ... | head`): socket errors never
        # get here, the client turns them into DaemonUnreachable.
        _silence_stdout()
        return EXIT_PIPE


def fail(args: "Any", code: int, reason: str, message: str, data: "Any" = None) -> int:
    """Report an error on stderr, and as JSON on stdout with --json; return ``code``."""
    print(f"velodctl: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        try:
            print_json({"ok": False, "exit_code": code,
                        "error": {"code": reason, "message": message, "data": data}})
        except BrokenPipeError:
            _silence_stdout()
    return code


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail again."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# ---------------------------------------------------------------------------- commands


def cmd_ping(args: "argparse.Namespace", client: "Client") -> int:
    start = time.perf_counter()
    client.call("system.ping")
    ms = (time.perf_counter() - start) * 1000
    if args.json:
        print_json({"ok": True, "ms": ms})
    else:
        print(f"velod answered in {ms:.2f} ms")
    return EXIT_OK


def cmd_status(args: "argparse.Namespace", client: "Client") -> int:
    status = client.call("system.status")
    if args.json:
        print_json(status)
        return EXIT_OK
    print(render_status(status))
    return EXIT_OK


def render_status(s: "dict[str, Any]") -> str:
    lines = [f"velod {s['version']}: running, pid {s['pid']}, up {human_duration(s['uptime'])}"]
    reload = s.get("last_reload") or {}
    source = s.get("config_source", "loaded")
    where = (s["config_path"] if source == "loaded" else
             f"built-in defaults ({s['config_path']} "
             f"{'does not exist' if source == 'missing' else 'is empty'})")
    if reload.get("time"):
        verdict = "ok" if reload.get("ok") else "refused, running config kept"
        lines.append(f"config: {where} (last reload {ago(reload['time'])} by "
                     f"{reload.get('trigger')}: {verdict})")
    else:
        lines.append(f"config: {where}" + (" (loaded at start)" if source == "loaded" else ""))
    if reload and not reload.get("ok"):
        lines.extend(f"  {e}" for e in (reload.get("errors") or [reload.get("error")]))
    lines.extend(f"  note: {n}" for n in reload.get("notes") or [])
    for name, reason in (reload.get("refused") or {}).items():
        lines.append(f"  {name} kept its previous config: {reason}")
    control = s.get("control") or {}
    lines.append(f"socket: {s.get('socket')} ({control.get('connections', 0)} connected, "
                 f"{control.get('requests', 0)} requests served)")
    rows = []
    for name, comp in (s.get("components") or {}).items():
        detail = comp.get("error") or comp.get("summary") or ""
        rows.append([name, str(comp.get("state", "?")), str(detail)])
    if rows:
        lines.append("components:")
        lines.append("\n".join("  " + r for r in table(rows).splitlines()))
    return "\n".join(lines)


def cmd_reload(args: "argparse.Namespace", client: "Client") -> int:
    result = client.call("config.reload", timeout=120)
    if args.json:
        print_json(result)
    elif result.get("applied"):
        print("config reloaded")
        for name, reason in (result.get("refused") or {}).items():
            print(f"  {name} kept its previous config: {reason}")
        for note in result.get("notes") or []:
            print(f"  note: {note}")
    else:
        print("config refused; the running config stays:", file=sys.stderr)
        for line in result.get("errors") or [result.get("error")]:
            print(f"  {line}", file=sys.stderr)
    return EXIT_OK if result.get("applied") else EXIT_REMOTE


def cmd_watch(args: "argparse.Namespace", client: "Client") -> int:
    events = client.subscribe(args.topics)
    reply = client.last_result or {}
    unmatched = reply.get("unmatched") or []
    for pattern in unmatched:
        print(f"velodctl: no event topic matches {pattern!r}; velod publishes: "
              f"{', '.join(reply.get('known') or [])}", file=sys.stderr)
    if unmatched and len(unmatched) == len(args.topics):
        return fail(args, EXIT_USAGE, "invalid_params", "nothing to watch")
    try:
        for event in events:
            if args.json:
                print_json_line(event)
                continue
            stamp = time.strftime("%H:%M:%S", time.localtime(event.get("time", 0)))
            print(f"{stamp} {event.get('topic')} {event_brief(event.get('data') or {})}"
                  .rstrip(), flush=True)
    except KeyboardInterrupt:  # the way to stop watching: not an error
        return EXIT_OK
    return EXIT_OK


def event_brief(data: "dict[str, Any]") -> str:
    """One line for an event's data: its message(s), else its plain values, numbers rounded."""
    if data.get("message"):
        return str(data["message"])
    parts = []
    for key, value in data.items():
        if isinstance(value, list) and value and all(
                isinstance(v, dict) and v.get("message") for v in value):
            parts.append("; ".join(str(v["message"]) for v in value))
        elif not isinstance(value, dict | list):
            parts.append(f"{key}={rounded(value)}")
    return " ".join(parts)


def rounded(value: "Any") -> str:
    """Numbers the way people read them: 3.142, 0.000123, 12346; other values unchanged."""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def cmd_config_show(args: "argparse.Namespace", client: "Client") -> int:
    result = client.call("config.get")
    if args.json:
        print_json(result)
    else:
        import yaml

        print(f"# running config, loaded from {result['path']}")
        print(yaml.safe_dump(result["config"], sort_keys=False).rstrip())
    return EXIT_OK


def cmd_config_validate(args: "argparse.Namespace", client: "Client | None") -> int:
    try:
        with open(args.file, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        print(f"velodctl: cannot read {args.file}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        with Client.connect(args.socket) as daemon:
            result = daemon.call("config.validate", {"text": text, "name": args.file})
    except DaemonUnreachable:
        from velod.config import validate_text  # same validation, in-process

        result = validate_text(text, args.file)
    if args.json:
        print_json(result)
    elif result["valid"]:
        print(f"{args.file}: valid")
        for note in result.get("notes") or []:
            print(f"  note: {note}", file=sys.stderr)
    else:
        print(f"{args.file}: invalid", file=sys.stderr)
        for line in result["errors"]:
            print(f"  {line}", file=sys.stderr)
    return EXIT_OK if result["valid"] else EXIT_REMOTE


# Argument-free commands run without building the argparse parser (see the module doc).
FAST_COMMANDS = {("status",): cmd_status, ("ping",): cmd_ping}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
