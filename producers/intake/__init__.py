"""The HTTP intake: `awork-uploads api`, a producer for applications in any language.

Stack: FastAPI on uvicorn. FastAPI because the OpenAPI document is the contract other
applications code against, and FastAPI derives it from the same typed models the handlers use
(so the two cannot drift; tests/test_intake_openapi.py keeps ops/openapi.json equal to it);
it is Starlette underneath, so the streamed body path reads raw ASGI chunks without buffering.
uvicorn (with uvloop/httptools from `uvicorn[standard]`) is the ASGI server of the same family.
Both come from the optional `api` extra: an application that only enqueues from Python does
not install them.

The intake is a producer like the Python API and goes through the same code (producers.client:
validation, staging, record, the pre-built canvas messages); it keeps no state of its own, so
any number of copies can run behind a load balancer. Modules: settings (read once at start),
problems (RFC 9457 errors), auth (bearer tokens, rate), body (streamed request bodies into
staging), schemas (the OpenAPI models), routes_jobs, routes_batches, app, server.
"""
