"""What other applications import: `from producers import Uploads, JobSpec`.

Light on purpose: no dependency on workers/.
"""

from producers.client import JobNotFound, RedisUnavailable, Uploads
from producers.config import ConfigError
from producers.contract import JobState, SpecError, Target
from producers.records import Job, JobError
from producers.spec import JobSpec

__all__ = [
    "ConfigError",
    "Job",
    "JobError",
    "JobNotFound",
    "JobSpec",
    "JobState",
    "RedisUnavailable",
    "SpecError",
    "Target",
    "Uploads",
]
