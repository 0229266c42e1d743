"""What the tests share beyond fixtures: starting real processes on loopback, clients
that speak to them, and reference images (importable as `support`, tests/ being on the path)."""
