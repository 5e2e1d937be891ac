"""HTTP API, queue backends, engine, metrics, settings and the ``skipdit`` command line."""
