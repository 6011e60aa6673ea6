"""An OpenAI-compatible HTTP server over the engine: ``llm-engine serve``.

``build_app(engine, ...)`` (in ``llm_engine.server.app``) gives the ASGI app
(FastAPI); ``serve(engine, ...)`` (in ``llm_engine.server.cli``) runs it with
uvicorn until SIGINT/SIGTERM. Needs the ``server`` extra
(``pip install 'llm-engine[server]'``: fastapi, uvicorn, prometheus-client).
"""
