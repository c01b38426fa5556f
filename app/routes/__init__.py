"""One router per resource: meta (/-/...), home (/), models (/{model}), saes (/{model}/{sae}) and
features (/{model}/{sae}/{index}). app/main.py includes them, app pages first."""
