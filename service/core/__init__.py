"""The domain core that the API and the worker share: jobs, results and chunks in Redis, the queue, leases and
recovery, resolving requests, settings, labels, callbacks, datasets. No Litestar, no matplotlib, no torch."""
