"""Serving: a trained model over HTTP with Ray Serve, and as an MLflow model.

- ``settings.py``: every serving setting and its default (flags, YAML, the stage's ``with:``);
- ``interface.py``: requests and answers by the bundle's declared input and output types;
- ``source.py``: which model (``models:/NAME@ALIAS``, a version, a folder) and its loading;
- ``app.py``: the Ray Serve application (FastAPI ingress, batching, following the alias);
- ``deploy.py``: running it on a cluster, and the ``serve.deploy`` stage;
- ``pyfunc.py``: the MLflow model ``tune.evaluate`` logs for each version it registers.

Serving reaches a model only through its bundle (``components.bundle.load_model``): it
imports no model family.
"""
