"""An AUTOMATIC1111-compatible HTTP API over ldm.generate (scripts/serve.py starts it): `create_app` in app.py,
the job queue every front end shares in jobs.py."""
