"""Package data of FeatureScope: installed as featurescope.templates (see featurescope/assets.py)."""
