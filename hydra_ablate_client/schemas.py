"""The API's wire types (msgspec Structs), one definition for server and client.

Inside the hydra-ablate repository (or next to the server) these are `service.schemas` itself, so objects made by
either side are the same classes. In the stand-alone client distribution (clients/python) the server is absent and
`_wire.py`, a copy of service/schemas.py made when the wheel is built (a symlink in the repository), serves them.
"""

from __future__ import annotations

try:
    from service.schemas import *  # noqa: F403 - re-exports every wire type
    from service.schemas import JobPage, JobRequest, JobResult, JobStatus, ModelInfo, Progress
except ImportError:  # the stand-alone client
    from hydra_ablate_client._wire import *  # type: ignore[assignment,no-redef]  # noqa: F403
    from hydra_ablate_client._wire import (  # type: ignore[assignment]
        JobPage,
        JobRequest,
        JobResult,
        JobStatus,
        ModelInfo,
        Progress,
    )

__all__ = ["JobPage", "JobRequest", "JobResult", "JobStatus", "ModelInfo", "Progress"]
