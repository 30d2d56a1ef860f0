"""`ivl-fast serve`: an OpenAI-compatible server over one continuous batch (the optional extra ``[serve]``:
fastapi, uvicorn, prometheus-client). :mod:`.scheduler` steps the batch, :mod:`.protocol` reads OpenAI requests and
writes its responses, :mod:`.app` holds the routes, :mod:`.metrics` the Prometheus metrics."""
