"""FeatureScope: precompute and explore the features of JumpReLU sparse autoencoders (Gemma Scope and your own).

One import package: the core (models, sites, SAEs, the encoder, schema) at the top, `featurescope.precompute`
(the batch job, from the repository's precompute/ folder), `featurescope.app` (the web server, from app/),
and `featurescope.cli`, the composition root that wires them together. Templates, static files and the
Alembic migrations ship as package data (featurescope.assets finds them).
"""
