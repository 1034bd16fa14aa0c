"""`collabvit serve`: the Open Inference Protocol service and what keeps it answering
whatever its clients do (`guard`). FastAPI, uvicorn and prometheus_client live here and
nowhere else.

The service is split as KServe splits its server: `app` assembles the application (and
serves it) from the model's state (`model`), a data plane that knows no HTTP (`dataplane`,
with `batching` and `metrics` below it) and the routes that call it (`routes`);
`settings` says how it is set up.
"""
