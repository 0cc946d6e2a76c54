"""Run by the interpreter of a fresh install of the API image's file set (tests/test_dockerfile_install.py): store a
succeeded job in a real Redis, then fetch its result as Parquet through the real Litestar app."""

import gc
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import msgspec
import pyarrow.parquet as pq
from litestar.testing import TestClient

import service
from hydra_ablate_client.wire import JobResult
from service.api.app import create_app
from service.core.settings import Settings
from service.core.store import JobStore

redis_url, result_path = sys.argv[1], Path(sys.argv[2])
settings = Settings(redis_url=redis_url, key_prefix="image-check:", auth_enabled=False, allow_no_auth=True)
result = msgspec.json.decode(result_path.read_bytes(), type=JobResult)
store = JobStore.from_settings(settings)
status = store.create(result.provenance.spec, total=len(result.prompts) * len(result.components))
assert store.mark_running(status.id)
assert store.mark_succeeded(status.id, msgspec.json.encode(msgspec.structs.replace(result, id=status.id)))
with TestClient(create_app(settings)) as client:
    response = client.get(f"/v1/jobs/{status.id}/result", params={"format": "parquet"})
table = pq.read_table(io.BytesIO(response.content)) if response.status_code == 200 else None
print(json.dumps({
    "status": response.status_code,
    "content_type": response.headers.get("content-type"),
    "rows": table.num_rows if table is not None else None,
    "service_at": str(Path(service.__file__).parent),
    "torch": importlib.util.find_spec("torch") is not None,
}), flush=True)
# pyarrow's C++ thread pool can abort the interpreter's final teardown ("terminate called without an active
# exception", exit -6; apache/arrow#34314), intermittently and after all the work is done: it did once here under
# load. Free its objects while Arrow is alive, then leave without the teardown: the answer above is what is checked.
del table
gc.collect()
os._exit(0)
