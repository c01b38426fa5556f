"""One module per page's view: each data function returns its page's typed data (app/twin_models.py), which
feeds the HTML page, its `.json` twin and its htmx fragments alike. Queries are SQLAlchemy Core on
featurescope.schema with bound parameters.

    home.py          home(catalog), model_view(catalog, model_id)
    sae.py           sae_view(catalog, model_id, sae_id, FeatureQuery(...)): the feature table
    feature.py       feature_view(catalog, model_id, sae_id, index): the dashboard, one indexed row lookup
    links.py         feature_links(...): a feature's cross-layer links
    lineage.py       lineage_view(...): the links followed through every SAE of the model
    encode.py        encode_view(...): the live encoder's answer for a prompt, and search via inference
    feature_test.py  feature_test_view(...): one feature on the test box's text
    steer.py         steer_view(...): default and steered continuations
    contrast.py      contrast_form_view(...), contrast_run_view(...): a contrast run's progress and ranking
    detector.py      detector_view(...), applied_view(...): a saved detector, and its live score on a prompt
"""
