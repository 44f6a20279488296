"""`llava-jax serve`: an OpenAI-compatible chat-completions server with continuous batching.

The modules, one concern each:
    protocol.py   the request: fields checked, messages mapped onto the conversation template
    images.py     image_url parts: data: URLs, an allowed local directory, remote URLs when enabled
    scheduler.py  the serving loop: slots filled from the queue, one decode step for all, tokens to requests
    app.py        the Starlette endpoints, OpenAI-style errors, server-sent events
    server.py     putting it together; uvicorn in the foreground or on a background thread
    bench.py      `llava-jax bench-serve`
    cli.py        the `serve` and `bench-serve` subcommands
The device programs for continuous batching are `llava_jax/slots.py`.
"""
