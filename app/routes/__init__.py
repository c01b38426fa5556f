"""One router per resource: meta (/-/...), home (/), live (/{model}/encode, /{model}/steer,
/{model}/{sae}/{index}/test), models (/{model}), saes (/{model}/{sae}), features (/{model}/{sae}/{index})
and lineage (/{model}/{sae}/{index}/lineage). app/main.py includes them, app pages first, live before saes."""
