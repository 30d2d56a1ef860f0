"""`ivl-fast serve`: an OpenAI-compatible server over one continuous batch (the optional extra ``[serve]``:
fastapi, uvicorn, prometheus-client). :mod:`.scheduler` steps the batch, :mod:`.protocol` reads OpenAI requests and
writes its responses, :mod:`.app` holds the routes, :mod:`.metrics` the Prometheus metrics."""

# the largest request body a server takes by default (then 413): far above any prompt a context of 128k tokens holds
# as token ids. Here, not in app.py, so the CLI's flag can show it without importing the server.
DEFAULT_MAX_BODY_BYTES = 8 * 2**20
