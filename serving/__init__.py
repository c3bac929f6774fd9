"""Ray Serve application: batched reverse sampling over HTTP."""
