"""Default locations: system paths as root, XDG paths for everyone else.

Kept free of heavy imports: velodctl imports this on every call.
"""

import os

SYSTEM_SOCKET = "/run/velod/velod.sock"
SYSTEM_CONFIG = "/etc/velod/velod.yaml"
SYSTEM_STATE = "/var/lib/velod"


def _home() -> str:
    return os.path.expanduser("~")


def default_socket() -> str:
    """/run/velod/velod.sock as root; else $XDG_RUNTIME_DIR/velod/velod.sock.

    Without XDG_RUNTIME_DIR the fallback is /tmp/velod-<uid>/velod.sock; the daemon
    creates that directory 0700 and refuses it when another user owns it.
    """
    if os.geteuid() == 0:
        return SYSTEM_SOCKET
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "velod", "velod.sock")
    return os.path.join(fallback_socket_dir(), "velod.sock")


def fallback_socket_dir() -> str:
    """Per-user socket directory used when XDG_RUNTIME_DIR is unset."""
    return os.path.join("/tmp", f"velod-{os.geteuid()}")


def default_config() -> str:
    if os.geteuid() == 0:
        return SYSTEM_CONFIG
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(_home(), ".config")
    return os.path.join(base, "velod", "velod.yaml")


def default_state_dir() -> str:
    if os.geteuid() == 0:
        return SYSTEM_STATE
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(_home(), ".local", "state")
    return os.path.join(base, "velod")


def ensure_private_dir(path: str) -> None:
    """Create ``path`` 0700 if missing; refuse one owned by another user or open to others."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{path} belongs to uid {st.st_uid}, not to us; refusing to "
                              "put the socket there (set --socket or XDG_RUNTIME_DIR)")
    if st.st_mode & 0o022:
        raise PermissionError(f"{path} is writable by others; refusing to put the socket there")
