"""The tabular family: an MLP on a prepared table (``uses: tabular.mlp``)."""
