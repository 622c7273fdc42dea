"""The seam between the tuner and one kind of inference server: what a backend provides.

The tuner's loop (``velod.tuner.service``), its applier, closed loop and benchmarks speak
to a server only through a :class:`Backend`. A server kind is a few modules under
``backends/``: its HTTP client, its settings table, its planner rules, and a class that
implements this protocol (``ollama_backend.OllamaBackend``,
``llama_server_backend.LlamaServerBackend``). ``backends.configured`` lists the servers a
config manages.

What a backend answers, in the order the tuner asks:

- *observe*: ``fetch_state`` (one poll; errors are :class:`ServerError`), ``activity``
  (what moves when clients use it, and whether it is busy now), ``ready`` (one probe after a
  restart);
- *plan*: ``policy`` (the tuner's settings plus the server's own pins, and the settings its
  unit's command line fixes), ``plan`` (pure: hardware + state + policy -> Plan with the
  settings as the server names them), ``what_if_state``;
- *apply*: ``dropins`` (its systemd unit's drop-in directory), ``expectations`` and
  ``verify`` (after a restart: does the server run what was planned?);
- *measure*: ``bench_models``, ``bench_request`` (one streamed request -> a Sample),
  ``loaded_info``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from velod.config import Config, TunerConfig
    from velod.hardware.snapshot import Snapshot
    from velod.tuner.bench.spec import Sample
    from velod.tuner.dropin import DropinDir, Effective
    from velod.tuner.plan import Plan
    from velod.tuner.planner import Policy
    from velod.tuner.state import LoadedModel, ModelInfo


@dataclass(frozen=True)
class SettingsTable:
    """How a server kind reads its settings: ``normalize(name, value)`` gives canonical text
    (ValueError for a value the server refuses); ``defaults`` the value each name has when
    unset, as the server writes it."""

    normalize: Callable[[str, str], str]
    defaults: Mapping[str, str]

    def same(self, name: str, a: str, b: str) -> bool:
        """True when ``a`` and ``b`` mean the same value of ``name``."""
        try:
            return self.normalize(name, a) == self.normalize(name, b)
        except ValueError:
            return a.strip() == b.strip()

    def means_default(self, name: str, value: str) -> bool:
        """True when ``value`` is the server's own "use the default" spelling."""
        default = self.defaults.get(name)
        return default is not None and self.same(name, value, default)


class ServerError(Exception):
    """The server could not be asked, or answered something velod cannot use."""


class ServerUnreachable(ServerError):
    """Nothing answers at the address, or the connection broke mid-answer."""


class ServerTimeout(ServerError):
    """The server did not answer within the request timeout."""


class ServerHTTPError(ServerError):
    """The server answered with an HTTP error status (``status``)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class ServerBadResponse(ServerError):
    """The server answered, but not with data of the documented shape."""


class ServerState(Protocol):
    """What one poll saw; every kind's state has at least these fields."""

    version: str | None
    models: list[ModelInfo]
    loaded: list[LoadedModel]
    reachable: bool
    error: str | None


@dataclass(frozen=True)
class Verification:
    """Whether a restarted server runs the plan: ``ok``, why, and what was seen."""

    ok: bool
    message: str
    observed: Any = None


class UnitBackend:
    """What every backend derives alike from its config section: the systemd unit, its
    drop-in directory, and one client that is replaced when the address or timeout changes.

    A subclass sets ``unit_key`` (the config field that names the unit) and implements
    ``_client(config)`` and ``_section(config)`` (its section of a full config, or None when
    the config no longer manages it).
    """

    unit_key = "unit"
    state_type: Any = None  # the kind's state class (version, reachable and error fields)

    def __init__(self, config: Any) -> None:
        self.config = config
        self.client = self._client(config)
        self.dropins = self._dropins(config)

    def _client(self, config: Any) -> Any:
        raise NotImplementedError

    def _section(self, config: Config) -> Any:
        raise NotImplementedError

    def _dropins(self, config: Any) -> DropinDir:
        from velod.tuner.dropin import DropinDir

        return DropinDir(config.systemd_dir, getattr(config, self.unit_key), config.dropin)

    @property
    def url(self) -> str:
        return str(self.client.base_url)

    @property
    def unit(self) -> str:
        return str(getattr(self.config, self.unit_key))

    @property
    def systemd_dir(self) -> str:
        return str(self.config.systemd_dir)

    @property
    def systemctl(self) -> str:
        return str(self.config.systemctl)

    @property
    def request_timeout(self) -> float:
        return float(self.config.request_timeout)

    async def reconfigure(self, config: Config) -> bool:
        """Adopt this server's section of ``config``; True when the client was replaced."""
        section = self._section(config)
        if section is None:
            return False  # no longer managed: the tuner service stops this server's loop
        old, self.config = self.config, section
        self.dropins = self._dropins(section)
        if (old.url, old.request_timeout) == (section.url, section.request_timeout):
            return False
        await self.client.close()
        self.client = self._client(section)
        return True

    async def close(self) -> None:
        await self.client.close()

    def unreachable_state(self, last: Any, error: str) -> Any:
        """The last good state marked unreachable, or an empty one when there is none."""
        if last is not None:
            return dataclasses.replace(last, reachable=False, error=error)
        return self.state_type(version=None, reachable=False, error=error)


class Backend(Protocol):
    """One managed server of one kind (see the module docstring for the order of use)."""

    kind: str  # "ollama", "llama-server": what ``velodctl bench --backend`` takes
    name: str  # unique among the managed servers: "ollama", "llama-server", ...
    label: str  # how messages call it: "Ollama", "llama-server at http://..."
    url: str
    unit: str
    systemd_dir: str
    systemctl: str
    request_timeout: float
    ready_timeout: float  # how long it may take to answer again after a restart
    dropins: DropinDir
    history_file: str  # the file name of its decision history in the state directory
    variants: bool  # whether it has per-model variants (Ollama's /api/create)

    async def reconfigure(self, config: Config) -> bool:
        """Adopt ``config``; True when the address or timeout changed (client replaced)."""

    async def close(self) -> None: ...

    async def fetch_state(self, tuner: TunerConfig) -> ServerState:
        """One poll of the server; raises ServerError when it cannot be read."""

    def unreachable_state(self, last: ServerState | None, error: str) -> ServerState:
        """The state to plan from while the server does not answer."""

    def describe(self, state: ServerState) -> dict[str, Any]:
        """What ``velodctl tune show`` prints about the server beside its settings."""

    def activity(self, state: ServerState) -> tuple[Any, bool, bool]:
        """(a marker that changes whenever clients use the server, busy right now, has a
        model in memory)."""

    async def ready(self) -> str:
        """One readiness probe (after a restart); its version or build, else ServerError."""

    def policy(self, tuner: TunerConfig, effective: Effective | None) -> Policy:
        """The planning policy: tuner settings, this server's pins, and the settings its
        unit's command line fixes (``locked``)."""

    def plan(self, snapshot: Snapshot, state: ServerState, policy: Policy) -> Plan: ...

    def what_if_state(self, models: list[str], state: ServerState) -> ServerState:
        """The server as if only ``models`` were installed: installed metadata first,
        velod's catalog for the others."""

    def expectations(self, plan: Plan) -> dict[str, Any]:
        """What to check after the restart that applies ``plan``."""

    def verify(self, state: ServerState, expected: dict[str, Any]) -> Verification | None:
        """Whether ``state`` runs as ``expected``; None while there is nothing to judge."""

    def installed_names(self) -> set[str]:
        """Every installed model name, velod's variants included (``variants`` only)."""

    async def create_variant(self, variant: str, model: str, params: dict[str, Any]) -> None:
        """Create ``variant`` from ``model`` with ``params`` (``variants`` only)."""

    async def bench_models(self) -> list[tuple[str, str | None]]:
        """(name, digest) of every model a benchmark may use."""

    async def bench_request(self, model: str, prompt: str, gen: int) -> Sample:
        """One streamed generation of ``gen`` tokens, timed."""

    async def loaded_info(self, model: str) -> dict[str, Any] | None:
        """How ``model`` sits in memory now (for a benchmark's record), if known."""
