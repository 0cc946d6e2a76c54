"""hydra-ablate's Python client, installable without torch or the server: `pip install ./clients/python`
(optional extras: `[pandas]`, `[arrow]`).

    from hydra_ablate_client import HydraClient
    with HydraClient("http://gpu-box:8000", api_key="…") as c:
        job = c.submit({"preset": "hydra", "dataset": {"name": "known_1000", "limit": 8}})
        frame = c.result(c.wait(job.id).id).to_pandas()       # long table; "summary", "response", …

Modules: `http` (the clients and HydraError), `wire` (the API's msgspec types), `vocabulary` (every option list,
the component-name grammar; standard library only) and `tables` (results as long tables). The server, the worker
and the `hydra-ablate` CLI import these same modules.
"""

from hydra_ablate_client.http import AsyncHydraClient, HydraClient, HydraConnectionError, HydraError
from hydra_ablate_client.tables import TABLES, table, to_arrow, to_pandas
from hydra_ablate_client.wire import JobPage, JobRequest, JobResult, JobStatus, ModelInfo, Progress

__all__ = [
    "TABLES",
    "AsyncHydraClient",
    "HydraClient",
    "HydraConnectionError",
    "HydraError",
    "JobPage",
    "JobRequest",
    "JobResult",
    "JobStatus",
    "ModelInfo",
    "Progress",
    "table",
    "to_arrow",
    "to_pandas",
]
