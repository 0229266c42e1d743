"""The gateway's routes, one router a module: health, the /v1 API, jobs, the
routes compatible with earlier services, and the web page."""
