"""`diffrt serve`: an HTTP front end (FastAPI + uvicorn) with an in-process micro-batcher.

Import `diffrt.serve.app.create_app` for the ASGI app; this package imports nothing heavy itself, so the
`diffrt` CLI can register the `serve` subcommand without the serve extra installed.
"""
