"""The sandbox object the three front doors share: API, blob host and admin API.

Static configuration (addresses, keys, tokens, data directory) is fixed at start;
`Settings` (faults, limits, switches) can be replaced at run time through `apply_settings`.
"""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from .faults import FaultInjector
from .oauth import OAuthServer
from .ratelimit import RateLimiter
from .sas import Signer
from .settings import Settings
from .state import SandboxState

UPLOAD_CONTAINER = "uploads"
_USER_NAMESPACE = uuid.UUID("6f1c3a8e-2b7d-4e59-9a0c-5d3e8f1b2a47")


@dataclass
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    blob_port: int | None = None  # None: port + 1, or any free port when port is 0
    public_host: str | None = None  # the host name put into URLs; default: host
    api_keys: dict[str, str] = field(default_factory=dict)  # key -> workspace
    oauth_clients: dict[str, str] = field(default_factory=dict)  # OAuth client id -> secret
    oauth_access_lifetime_s: float = 86400.0
    admin_token: str = ""
    data_dir: Path = Path("var/sandbox")
    access_log: bool = False


class Sandbox:
    def __init__(self, config: SandboxConfig, settings: Settings) -> None:
        self.config = config
        self.initial_settings = settings
        self.settings = settings
        self.state = SandboxState(config.data_dir)
        self.limiter = RateLimiter(settings.rate_limits, settings.workspace_limits)
        self.faults = FaultInjector(settings)
        self.signer = Signer(secrets.token_bytes(32))
        # awork answers as the API key's user: one stable user id per key.
        self.user_ids = {k: str(uuid.uuid5(_USER_NAMESPACE, k)) for k in config.api_keys}
        self.oauth = OAuthServer(config.oauth_clients)
        self.oauth.access_lifetime_s = config.oauth_access_lifetime_s
        self.api_base = ""  # http://host:port/api/v1, set once the sockets are bound
        self.blob_base = ""  # http://host:port
        self.admin_base = ""

    def apply_settings(self, new: Settings, reseed: bool) -> None:
        self.settings = new
        self.limiter.default = new.rate_limits
        self.limiter.overrides = dict(new.workspace_limits)
        self.faults.configure(new, reseed=reseed)

    def reset(self, entities: bool, faults: bool) -> None:
        """Forget uploads, files, counters and rate windows; re-seed the fault streams."""
        self.state.reset(entities=entities)
        self.limiter.reset()
        self.apply_settings(self.initial_settings if faults else self.settings, reseed=True)
