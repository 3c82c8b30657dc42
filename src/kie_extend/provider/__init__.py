"""KIE, the provider: its HTTP client and route adapters, file uploads, the local audio probe and
the URL guard. Nothing here knows Celery or Redis."""
