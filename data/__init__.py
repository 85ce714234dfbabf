"""The embedded sample set, shipped inside the package as ``mobilenet_fn.sample`` (see make_sample.py)."""
