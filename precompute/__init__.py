"""The precompute batch job: read a corpus once, encode it with every requested SAE, and turn the
activations into per-feature dashboard statistics for the DuckDB file the server reads.

    precompute.feature_stats   streaming statistics from the activations (top-k, intervals, histogram, density)
    precompute.static_stats    statistics from the weights alone (logit effect, decoder-cosine neighbours)

This package imports the featurescope core (models, sites, SAEs, encoder, schema), never `app/`.
"""
