"""Package data of FeatureScope: installed as featurescope.migrations (see featurescope/assets.py)."""
