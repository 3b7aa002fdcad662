"""The node daemon: identity on disk, enrollment, heartbeats, the worker that runs
its assignment through `model`, signing and uploading updates.
"""
