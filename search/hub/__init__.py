"""The hub service: HTTP API for remote agents and read access to stored searches.

``search.hub.app`` builds the FastAPI application; it imports the study's read side only, never
torch (a test checks it).
"""
