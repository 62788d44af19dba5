"""Who may read staged copies: AWORK_STAGING_MODE.

Staged bytes are other people's files. By default (`private`) a staged file is 0600 and its job
folder 0700 whatever the umask, which fits producers and workers running as one user. `group`
(0640 files, 0770 folders) is for producers and workers running as different users of one group
over a shared STAGING_DIR: the workers read the files and, once a job is done, delete the job's
folder, which takes write permission on the folder (hence 0770, not 0750). Make STAGING_DIR
itself group-owned, group-writable and setgid (`chmod 2770`) so new folders get its group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

ENV_NAME = "AWORK_STAGING_MODE"


class StagingModeError(ValueError):
    """AWORK_STAGING_MODE holds something else than `private` or `group`."""


@dataclass(frozen=True)
class StagingMode:
    name: str
    file_mode: int
    dir_mode: int

    @classmethod
    def parse(cls, raw: str | None) -> StagingMode:
        value = (raw or "").strip().lower() or "private"
        try:
            return MODES[value]
        except KeyError:
            raise StagingModeError(f"{ENV_NAME}: expected private or group, got {raw!r}") from None

    @classmethod
    def from_env(cls) -> StagingMode:
        return cls.parse(os.environ.get(ENV_NAME))


PRIVATE = StagingMode("private", 0o600, 0o700)
GROUP = StagingMode("group", 0o640, 0o770)
MODES = {m.name: m for m in (PRIVATE, GROUP)}
