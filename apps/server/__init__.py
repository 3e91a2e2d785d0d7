"""``sun-edge serve``: an HTTP image server on the ``sun_edge`` library (A1111, OpenAI and native APIs).

Modules: ``engine`` (queue and batching worker), ``source`` (the bundle or model, opened as
``sun-edge generate`` opens it), ``generation`` (one request through the engine), ``limits`` (bounds
and one-line errors), ``api_native``, ``api_a1111``, ``api_openai``, ``metrics``, ``app`` (the FastAPI
app), ``serve`` (uvicorn, graceful shutdown), ``loadtest`` (``sun-edge bench-serve``), ``cli_args``
(the subcommands' flags). Importing this package imports nothing heavy: FastAPI loads with ``app``.
Installed with ``pip install "sun-edge[server]"``.
"""
