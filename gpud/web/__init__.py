"""gpud's HTTP surface besides the proxy: the JSON API, the status page, /metrics."""
