"""recsvc: personalized product recommendations for e-commerce storefronts (online side)."""

__version__ = "0.1.0"
