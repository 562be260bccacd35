"""The Flask front end: takes requests, never starts a kernel itself.

The app is built by ``poolgate.gateway.app.create_app``; this package's own module stays empty, so the
pure modules (framing, zmtp, wire) import without Flask.
"""
