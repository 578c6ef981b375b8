"""The midfill Ray Serve application: OpenAI-compatible infill endpoint."""
