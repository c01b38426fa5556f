"""Package data of FeatureScope: installed as featurescope.static (see featurescope/assets.py)."""
