"""The velod daemon: builds the components, serves the control socket, reloads its config.

Everything runs in one asyncio loop. The components and their control methods come from one
table, ``velod.capabilities``; the daemon's own methods are in ``velod.rpc``. A config change
(file watch, SIGHUP, ``config.reload``) is loaded and validated here, then handed to every
component's ``reconfigure``. ``main()`` is the ``velod`` console script.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from velod import PROTOCOL_VERSION, __version__, paths
from velod import rpc as daemon_rpc
from velod.bus import Bus
from velod.capabilities import CAPABILITIES, Capability
from velod.component import TROUBLE, Component, Context, ReconfigureRefused, Unavailable
from velod.config import Config, ConfigError, ConfigIssue, cap, to_plain, validate_text
from velod.config_file import BLANK_HINT, CheckLanes, LaneBusy, read_file
from velod.config_watch import watch_config
from velod.control.registry import Registry, methods_of
from velod.control.server import ControlServer, SocketInUse
from velod.systemd import Notifier, listen_socket, monotonic_usec, set_level, setup_logging

log = logging.getLogger("velod")

EX_CONFIG = 78  # sysexits.h; the unit's RestartPreventExitStatus= keeps systemd from looping
STOP_TIMEOUT = 3.0


def _load_component_class(spec: str) -> type[Component]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


class Daemon:
    def __init__(self, config: Config, config_path: Path, *, socket_override: str | None = None,
                 log_level_override: str | None = None, file_state: str = "loaded") -> None:
        self.config = config
        self.config_path = config_path
        # Where the running config came from: "loaded" (the file), or "missing"/"blank"
        # when velod started on its built-in defaults.
        self.config_source = file_state
        # Config checks run off the loop, bounded in time; lanes keep callers apart.
        self.checks = CheckLanes(timeout=5.0)
        self.socket_override = socket_override
        self.log_level_override = log_level_override
        self.bus = Bus()
        self.registry = Registry()
        self.server = ControlServer(self.registry, config.control)
        self.notifier = Notifier()
        self.components: list[Component] = []
        self.started_monotonic = time.monotonic()
        self.started_at = time.time()
        self.last_reload: dict[str, Any] = {"time": None, "trigger": None, "ok": True,
                                            "error": None, "refused": {}}
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[Any]] = []

    # -------------------------------------------------------------------- paths
    @property
    def socket_path(self) -> Path:
        raw = self.socket_override or self.config.control.socket or paths.default_socket()
        return Path(raw).absolute()

    @property
    def state_dir(self) -> Path:
        return Path(self.config.state_dir or paths.default_state_dir())

    # -------------------------------------------------------------------- lifecycle
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._spawn(self.reload("SIGHUP")))

        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        except OSError as exc:  # components that need it report it; the rest still runs
            log.error("cannot create the state directory %s: %s", self.state_dir, exc)
        self.registry.add_all(methods_of(daemon_rpc, self))
        self._build_components()

        activated = listen_socket()
        try:
            if activated is None and str(self.socket_path.parent) == paths.fallback_socket_dir():
                paths.ensure_private_dir(str(self.socket_path.parent))
            await self.server.start(None if activated else self.socket_path, activated)
        except (SocketInUse, OSError) as exc:
            log.error("cannot listen on %s: %s", self.socket_path, exc)
            return 1

        for component in self.components:
            await self._start_component(component)
        self._spawn(watch_config(self.config_path, lambda: self.reload("file change"),
                                 self._stop))
        if self.notifier.watchdog_interval:
            self._spawn(self._watchdog(self.notifier.watchdog_interval))

        log.info("velod %s ready on %s (config %s%s)", __version__,
                 self.server.path or "an activated socket", self.config_path,
                 "" if self.config_source == "loaded" else ": none, built-in defaults")
        self.notifier.send("READY=1", f"STATUS={self._status_line()}", f"MAINPID={os.getpid()}")
        await self._stop.wait()

        log.info("stopping")
        self.notifier.send("STOPPING=1")
        await self._shutdown()
        return 0

    def request_stop(self, after: float = 0.0) -> None:
        """Stop the daemon (``after`` seconds from now)."""
        if after:
            asyncio.get_running_loop().call_later(after, self._stop.set)
        else:
            self._stop.set()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.remove(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    def _build_components(self) -> None:
        for capability in CAPABILITIES:
            try:
                component = self._build(capability)
            except (ImportError, AttributeError) as exc:
                log.warning("capability %s not available: %s", capability.name, exc)
                continue
            self.components.append(component)

    def _build(self, capability: Capability) -> Component:
        cls = _load_component_class(capability.service)
        ctx = Context(config=self.config, bus=self.bus, state_dir=self.state_dir,
                      log=logging.getLogger("velod"), on_state_change=self._state_changed,
                      services={c.name: c for c in self.components})
        try:
            component = cls(ctx)
        except Exception as exc:  # a config that validated must not stop the daemon
            log.exception("component %s could not be created", capability.name)
            return Unavailable(ctx, capability.name, f"could not be created: {exc}")
        self.registry.add_all(methods_of(importlib.import_module(capability.rpc), component))
        return component

    async def _start_component(self, component: Component) -> None:
        component.state = "starting"
        try:
            await component.start()
        except Exception as exc:
            log.exception("component %s failed to start", component.name)
            component.state, component.error = "failed", f"start failed: {exc}"

    async def _shutdown(self) -> None:
        async def stop_one(component: Component) -> None:
            try:
                await component.stop()
            except Exception:
                log.exception("component %s failed to stop", component.name)

        stops = [stop_one(c) for c in reversed(self.components)]
        try:
            await asyncio.wait_for(asyncio.gather(*stops), STOP_TIMEOUT)
        except TimeoutError:
            log.warning("components did not stop within %.0fs; exiting anyway", STOP_TIMEOUT)
        await self.server.stop()
        for task in list(self._tasks):
            task.cancel()
        self.notifier.close()

    async def _watchdog(self, interval: float) -> None:
        # Sent from the serving loop itself: a stalled loop stops the pings.
        while True:
            self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval / 2)

    # -------------------------------------------------------------------- reload
    async def reload(self, trigger: str) -> dict[str, Any]:
        """Load the config file again and hand it to every component, or refuse it."""
        async with self._reload_lock:
            self.notifier.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                               "STATUS=reloading configuration")
            try:
                result = await self._reload(trigger)
            finally:
                self.notifier.send("READY=1", f"STATUS={self._status_line()}")
            return result

    async def _reload(self, trigger: str) -> dict[str, Any]:
        now = time.time()
        try:
            loaded = await self.checks.run("reload", read_file, self.config_path)
        except ConfigError as exc:
            return self._refuse(now, trigger, str(exc), exc.lines())
        except (TimeoutError, LaneBusy) as exc:
            return self._refuse(now, trigger, f"reading {self.config_path} did not finish "
                                f"in time ({exc or 'timed out'})", [])
        if loaded.state != "loaded":
            if self.config_source != "loaded":  # on the defaults already: nothing changes
                self.config_source = loaded.state
                note = f"{loaded.describe(self.config_path)}; running on built-in defaults"
                self.last_reload = {"time": now, "trigger": trigger, "ok": True, "error": None,
                                    "errors": [], "refused": {}, "notes": [note]}
                log.info("config reload (%s): %s", trigger, note)
                return {"applied": True, **self.last_reload}
            reason = (f"{loaded.describe(self.config_path)}; keeping the running config "
                      f"({BLANK_HINT})")
            return self._refuse(now, trigger, reason, [reason])
        new = loaded.config

        refused: dict[str, str] = {}
        for component in self.components:
            try:
                await component.reconfigure(new)
            except ReconfigureRefused as exc:
                refused[component.name] = str(exc)
            except Exception as exc:
                log.exception("component %s failed to reconfigure", component.name)
                refused[component.name] = f"{type(exc).__name__}: {exc}"
        notes = []
        if new.control.socket != self.config.control.socket:
            notes.append("control.socket takes effect at the next restart")
        self.config = new
        self.config_source = "loaded"
        self.server.reconfigure(new.control)
        set_level(self.log_level_override or new.log.level)
        self.last_reload = {"time": now, "trigger": trigger, "ok": True, "error": None,
                            "errors": [], "refused": refused, "notes": notes}
        for name, reason in refused.items():
            log.warning("component %s kept its previous config: %s", name, reason)
        log.info("config reloaded (%s)", trigger)
        self.bus.publish("config.reloaded", {"trigger": trigger, "refused": refused})
        return {"applied": True, **self.last_reload}

    def _refuse(self, now: float, trigger: str, message: str,
                errors: list[str]) -> dict[str, Any]:
        """Keep the running config; record, log and publish why (every text bounded)."""
        message = cap(message)
        self.last_reload = {"time": now, "trigger": trigger, "ok": False, "error": message,
                            "errors": errors, "refused": {}}
        log.error("config reload (%s) refused, keeping the running config: %s",
                  trigger, message)
        self.bus.publish("config.reload_failed", {"trigger": trigger, "error": message})
        return {"applied": False, **self.last_reload}

    def _state_changed(self, component: Component, old: str, new: str) -> None:
        """Tell systemd (``STATUS=``) and subscribers whenever a component's state changes."""
        self.notifier.send(f"STATUS={self._status_line()}")
        trouble = f": {cap(str(component.error), 300)}" if new in TROUBLE else ""
        self.bus.publish("component.state", {
            "component": component.name, "state": new, "was": old,
            "message": f"{component.name} {new} (was {old}){trouble}"})

    async def validate(self, text: str, name: str, admin: bool) -> dict[str, Any]:
        """``validate_text`` off the loop, bounded in time (LaneBusy, TimeoutError); checks
        from unprivileged peers never hold up an admin's."""
        return await self.checks.run("admin" if admin else "others", validate_text, text,
                                     name[:200])

    # -------------------------------------------------------------------- control methods
    def _status_line(self) -> str:
        """One line for ``systemctl status``: where velod serves and each component's state."""
        parts = []
        for c in self.components:
            trouble = c.state in TROUBLE and c.error
            parts.append(f"{c.name} {c.state}" + (f" ({cap(str(c.error), 120)})"
                                                   if trouble else ""))
        where = f"serving on {self.server.path or 'an activated socket'}"
        line = f"{where}; {', '.join(parts)}" if parts else where
        if self.config_source != "loaded":
            line += "; built-in defaults"
        return cap(line, 1000)

    def hello(self, admin: bool) -> dict[str, Any]:
        """Name, version, protocol and methods (and whether the caller is an admin)."""
        return {"name": "velod", "version": __version__, "protocol": PROTOCOL_VERSION,
                "methods": self.registry.names(), "admin": admin}

    def status(self) -> dict[str, Any]:
        """The daemon and each component, for ``velodctl status``."""
        components = {}
        for component in self.components:
            try:
                components[component.name] = component.status()
            except Exception as exc:
                components[component.name] = {"state": "failed", "error": f"status: {exc}"}
        return {
            "name": "velod", "version": __version__, "pid": os.getpid(),
            "uptime": time.monotonic() - self.started_monotonic, "started_at": self.started_at,
            "config_path": str(self.config_path), "state_dir": str(self.state_dir),
            "config_source": self.config_source,
            "config_loaded_from": (str(self.config_path) if self.config_source == "loaded"
                                   else None),
            "socket": str(self.server.path) if self.server.path else None,
            "last_reload": self.last_reload, "components": components,
            "control": self.server.status(), "systemd": self.notifier.enabled,
        }

    def running_config(self) -> dict[str, Any]:
        return {"path": str(self.config_path), "config": to_plain(self.config)}


# ------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velod", description="velod: the autopilot for local "
                                     "LLM inference (runs in the foreground).")
    parser.add_argument("--config", metavar="FILE",
                        help=f"config file (default {paths.default_config()}; missing = "
                        "built-in defaults)")
    parser.add_argument("--socket", metavar="PATH", help="control socket path (overrides "
                        "control.socket)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="overrides log.level")
    parser.add_argument("--check-config", metavar="FILE", help="validate FILE and exit "
                        "(0 = valid, 1 = the list of errors)")
    parser.add_argument("--version", action="version", version=f"velod {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_config:
        try:
            load_config_strict(Path(args.check_config))
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.check_config}: valid")
        return 0

    config_path = Path(args.config or paths.default_config()).absolute()
    try:
        loaded = read_file(config_path)
    except ConfigError as exc:
        print(f"velod: {exc}", file=sys.stderr)
        return EX_CONFIG
    setup_logging(args.log_level or loaded.config.log.level)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
    if loaded.state != "loaded":
        log.warning("%s: running on the built-in defaults", loaded.describe(config_path))
    daemon = Daemon(loaded.config, config_path, socket_override=args.socket,
                    log_level_override=args.log_level, file_state=loaded.state)
    # A worker thread running Python (a config check) hands the GIL back to the serving
    # loop within 1 ms instead of 5: pings stay fast while a large config is checked.
    sys.setswitchinterval(0.001)
    try:
        code = asyncio.run(daemon.run())
    except KeyboardInterrupt:
        code = 0
    logging.shutdown()
    return code


def load_config_strict(path: Path) -> Config:
    """The file's config for --check-config: a missing file is an error, a blank one is
    valid (it would mean the defaults at start) and said so."""
    loaded = read_file(path)
    if loaded.state == "missing":
        raise ConfigError(str(path), [ConfigIssue("", str(path), "no such file")])
    if loaded.state == "blank":
        print(f"{path}: note: {loaded.describe(path)}; at start that means the built-in "
              f"defaults, while running velod keeps its config ({BLANK_HINT})",
              file=sys.stderr)
    return loaded.config


if __name__ == "__main__":  # pragma: no cover
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
