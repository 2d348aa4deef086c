"""CNN families and the factory that builds them from config + data shape."""
