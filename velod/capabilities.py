"""The one table of velod's capabilities, read by the daemon and by velodctl.

Each row names the component the daemon builds (``module:Class``; it is also the service
the RPC functions call), the module whose ``@rpc`` functions are its control methods, and
the velodctl module (``register(sub)``) with the commands it adds. Adding a capability is a
row here plus its package; its config section lives in ``velod.config`` with the others.
Imports nothing: velodctl reads it on every start.
"""


class Capability:
    """One row: name, service class, rpc module, cli module and the commands it provides."""

    __slots__ = ("cli", "commands", "name", "rpc", "service")

    def __init__(self, name: str, service: str, rpc: str, cli: str,
                 commands: "tuple[str, ...]") -> None:
        self.name = name
        self.service = service
        self.rpc = rpc
        self.cli = cli
        self.commands = commands


CAPABILITIES = (
    Capability("hardware", "velod.hardware.service:HardwareMonitor", "velod.hardware.rpc",
               "velod.hardware.cli", ("hw",)),
    Capability("tuner", "velod.tuner.servers:TunerService", "velod.tuner.rpc", "velod.tuner.cli",
               ("ollama", "tune", "bench")),
    Capability("engine", "velod.engine.service:EngineService", "velod.engine.rpc",
               "velod.engine.cli", ("engine", "generate")),
    # Last: it serves the services built before it (ctx.services).
    Capability("http", "velod.http.service:HttpServer", "velod.http.rpc", "velod.http.cli", ()),
)


def cli_modules() -> "dict[str, str]":
    """velodctl command -> the module that registers it."""
    return {command: c.cli for c in CAPABILITIES for command in c.commands}
