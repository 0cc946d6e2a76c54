"""The HTTP app (Litestar): the app factory, routes (controllers/), the web pages (ui/), authentication, rate
limits, idempotency, readiness, the OpenAPI document and Prometheus metrics. Calls the core and rendering."""
