"""
Seeing the fleet: the figures the roles keep, Prometheus metrics made from
them, and the read-only admin endpoint (metrics, health, JSON API, status
page) that serves them.
"""
