"""Pure stage functions (imported as ``opsd.stages``): ``run(config, inputs, ctx) -> manifest``.

No Prefect, no catalog: callable from flows, tests, scripts and a GPU machine without servers.
"""
