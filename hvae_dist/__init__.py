"""hvae-dist: hierarchical VAEs at cluster scale, and out-of-distribution scores with them."""

__version__ = "0.1.0"
