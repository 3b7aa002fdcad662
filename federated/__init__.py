"""Flower mode: ServerApp/ClientApp, Opacus DP-SGD, SecAgg+, robust strategies.
"""
