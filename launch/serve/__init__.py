"""Serving: an OpenAI-compatible HTTP service for a tessera job, on Ray Serve.

``tessera serve`` (``launch/commands/serve.py``) and ``tessera.serve(...)``
(``launch/api.py``) start it through :func:`tessera.launch.serve.server.start`.
The pieces, one job each: ``options`` (ServeOptions: bind address, API key,
queue bound), ``server`` (Ray, Serve, deploy, shut down), ``deployment`` (the
replica that owns the job: controller, workers, engine, loop), ``app`` (the
FastAPI routes, auth, errors, health, metrics), ``llm`` (completions and chat
over the async engine loop), ``images`` (the image loop), ``schemas`` (OpenAI
request models), ``chat_template`` (jinja2 as transformers renders),
``text`` (incremental detokenization, stop strings), ``metrics``
(Prometheus), ``auth`` (Bearer keys).
"""
