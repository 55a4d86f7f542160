"""Vision: a CNN classifier (``model.py``) and its Ray Train loop (``train.py``)."""
